//! The NBD server over a plain file: reachable on loopback TCP as well as the Unix socket
//! (with a real client, qemu-io), and never on a non-loopback address.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use hapair_agent::nbd::export::FileExport;
use hapair_agent::nbd::server::{NbdServer, ServeError};

fn file(dir: &std::path::Path) -> Arc<FileExport> {
    let path = dir.join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(4 << 20).unwrap();
    Arc::new(FileExport::open("disk", &path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_qemu_io_on_loopback_tcp_and_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let sock = dir.path().join("disk.sock");
    let _server = NbdServer::start(file(dir.path()), &sock, Some(addr)).await.unwrap();
    let tcp = format!("nbd://127.0.0.1:{port}/disk");
    let unix = format!("nbd+unix:///disk?socket={}", sock.display());
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 7 0 64k", "-c", "flush", &tcp])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 7 0 64k", &unix])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && !text.contains("fail"), "{text}{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test]
async fn refuses_a_non_loopback_tcp_address() {
    let dir = tempfile::tempdir().unwrap();
    let err = NbdServer::start(file(dir.path()), &dir.path().join("s"), Some("198.18.0.1:10809".parse().unwrap()))
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::NotLoopback(_)), "{err}");
}
