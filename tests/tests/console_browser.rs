//! The web console in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver and `fantoccini`), against a real standalone controller and two real
//! enrolled agents in network namespaces. The browser runs in the client namespace beside
//! the controller and reaches it at its HTTPS listener, as an operator's browser would.
//!
//! What it checks: the overview lists the group; a switchover clicked in the page moves the
//! active node (confirmed with the CLI); killing the active node shows the failover without
//! a reload; a viewer sees no action and gets 403 from the API; a wrong, expired or
//! timed-out token lands on the sign-in page; a POST without the CSRF token gets 403. It
//! saves screenshots of the overview and the group page under the target directory
//! (`console/`), which `docs/console.md` shows.
//!
//! Needs root (namespaces) and Debian's `chromium` and `chromium-driver`, which
//! `scripts/test.sh` installs; every wait is a bounded condition.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hapair_tests::agents::binary;
use hapair_tests::enrolled_pair::{EnrolledPair, PairOptions, UP};
use hapair_tests::netns::{ChildGuard, require_root, run_in, wait_for};
use serde_json::{Value, json};

const DRIVER_PORT: u16 = 9515;
/// Bound on what the page must show after a change: "within a second" plus a loaded CI.
const SHOWN: Duration = Duration::from_secs(15);

fn console_token(p: &EnrolledPair, role: &str, ttl: &str) -> String {
    let out = Command::new(binary("hapair-operator"))
        .args(["console-token", "create", "--state"])
        .arg(&p.controller.state)
        .args(["--role", role, "--name", &format!("{role}-tester"), "--ttl", ttl])
        .output()
        .unwrap();
    assert!(out.status.success(), "console-token create: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn screenshot_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// chromedriver in the current thread's namespace, and a headless Chromium session.
async fn browser(profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                // The controller's certificate is signed by its own CA, which this fresh
                // profile does not trust; the test is about the page, not the PKI.
                "--ignore-certificate-errors", "--window-size=1500,2200",
                "--no-first-run", "--no-default-browser-check",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    let mut last = None;
    for _ in 0..50 {
        match ClientBuilder::new(connector.clone())
            .capabilities(caps.clone())
            .connect(&format!("http://127.0.0.1:{DRIVER_PORT}"))
            .await
        {
            Ok(client) => return client,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("no WebDriver session: {last:?}");
}

/// Waits until the element at `css` shows text for which `want` holds; returns it.
async fn wait_text(c: &Client, css: &str, want: impl Fn(&str) -> bool, why: &str) -> String {
    let end = Instant::now() + SHOWN;
    let mut seen = String::new();
    while Instant::now() < end {
        if let Ok(e) = c.find(Locator::Css(css)).await
            && let Ok(text) = e.text().await
        {
            if want(&text) {
                return text;
            }
            seen = text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{why}: {css} shows {seen:?}");
}

async fn visible(c: &Client, id: &str) -> bool {
    c.execute(&format!("return !document.getElementById('{id}').hidden;"), vec![]).await.unwrap() == json!(true)
}

async fn sign_in(c: &Client, url: &str, token: &str) {
    c.goto(&format!("{url}/ui/")).await.unwrap();
    let field = c.wait().at_most(SHOWN).for_element(Locator::Css("#token")).await.unwrap();
    wait_until(c, "the sign-in page", || async { visible(c, "sign-in").await }).await;
    field.send_keys(token).await.unwrap();
    c.find(Locator::Css("#sign-in-button")).await.unwrap().click().await.unwrap();
}

async fn wait_until<F: std::future::Future<Output = bool>>(c: &Client, what: &str, check: impl Fn() -> F) {
    let end = Instant::now() + SHOWN;
    while Instant::now() < end {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shot = c.screenshot().await.unwrap_or_default();
    let path = screenshot_dir().join("failure.png");
    let _ = std::fs::write(&path, shot);
    panic!("the page never showed {what} (screenshot: {})", path.display());
}

/// `fetch` from inside the page, with the page's cookies; the status code.
async fn page_fetch(c: &Client, method: &str, path: &str, body: Value, csrf: bool) -> u16 {
    let script = r#"
        const [method, path, body, csrf, done] = arguments;
        const headers = {"content-type": "application/json"};
        const go = (token) => {
            if (token) headers["x-csrf-token"] = token;
            fetch(path, {method, headers, body: JSON.stringify(body), credentials: "same-origin"})
                .then((r) => done(r.status), (e) => done(String(e)));
        };
        if (csrf) fetch("/ui/api/session").then((r) => r.json()).then((s) => go(s.csrf), (e) => done(String(e)));
        else go(null);
    "#;
    let answer = c.execute_async(script, vec![json!(method), json!(path), body, json!(csrf)]).await.unwrap();
    u16::try_from(answer.as_u64().unwrap_or_else(|| panic!("fetch {path}: {answer}"))).unwrap()
}

fn cli_active(p: &EnrolledPair) -> Option<String> {
    let out = p.hapair(&["status", "-o", "json"]);
    let groups: Value = serde_json::from_str(&out).ok()?;
    let list = groups.get("groups").and_then(Value::as_array).cloned().or_else(|| groups.as_array().cloned())?;
    list.iter().find(|g| g["key"] == "default/web")?["status"]["activeNode"].as_str().map(str::to_string)
}

#[test]
fn the_console_shows_the_pair_live_runs_actions_for_operators_only_and_signs_out_bad_tokens() {
    require_root();
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        assert!(Path::new(tool).exists(), "{tool} is missing: apt-get install chromium chromium-driver");
    }
    // With a protocol C volume, so the page has storage, sync and volume rows to show.
    let mut p = EnrolledPair::start(PairOptions { volume: true, ..PairOptions::default() });
    let url = p.controller.url();
    let operator = console_token(&p, "operator", "1h");
    let viewer = console_token(&p, "viewer", "1h");
    let brief = console_token(&p, "viewer", "6s");
    let profile = tempfile::tempdir().unwrap();
    let mut driver = ChildGuard::new(
        p.topo
            .client
            .command("/usr/bin/chromedriver")
            .arg(format!("--port={DRIVER_PORT}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
        "chromedriver",
    );
    let client_ns = p.topo.client.path();
    let shots = screenshot_dir();
    run_in(client_ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let c = browser(profile.path()).await;

            // A wrong token, then an expired one: the sign-in page, with the reason.
            sign_in(&c, &url, "hpc_not-a-real-token.AAAA").await;
            wait_text(&c, "#sign-in-error", |t| t.contains("not issued by this controller"), "a wrong token").await;
            assert!(visible(&c, "sign-in").await && !visible(&c, "overview").await);

            // A token that ends while the page is open: the stream says so, the page goes
            // back to the sign-in page by itself.
            sign_in(&c, &url, &brief).await;
            wait_text(&c, "#groups tbody", |t| t.contains("default/web"), "the overview after sign-in").await;
            wait_text(&c, "#sign-in-error", |t| t.contains("expired"), "a session whose token ended").await;
            assert!(visible(&c, "sign-in").await);

            // The operator: the overview lists the group with its active node.
            sign_in(&c, &url, &operator).await;
            wait_text(&c, "#groups tbody tr[data-group='default/web'] td.active", |t| t == "a", "the active node")
                .await;
            wait_text(&c, "#connection", |t| t == "live", "the live indicator").await;
            std::fs::write(shots.join("overview.png"), c.screenshot().await.unwrap()).unwrap();

            c.find(Locator::Css("#groups a")).await.unwrap().click().await.unwrap();
            wait_text(&c, "#active-node", |t| t == "a", "the group page").await;
            // Both nodes side by side, with what the agents reported.
            for node in ["a", "b"] {
                let card = wait_text(
                    &c,
                    &format!(".node[data-node='{node}']"),
                    |t| t.contains("Kernel") && t.contains("CPU"),
                    "a node card",
                )
                .await;
                assert!(card.contains("heartbeat 0") || card.contains("link 0"), "links on {node}'s card: {card}");
            }
            wait_text(
                &c,
                "#vips tbody",
                |t| t.contains("198.18.0.100/24") && t.contains(" a"),
                "which node holds the VIP",
            )
            .await;
            wait_text(&c, "#flow tbody", |t| t.contains("Running"), "the flow's steps").await;
            wait_text(&c, "#volumes", |t| t.contains("data UpToDate") && t.contains("Connected"), "the volume").await;
            let card =
                wait_text(&c, ".node[data-node='b'] table.storage", |t| t.contains("b.img"), "b's storage").await;
            assert!(card.contains("free") && card.contains("MiB"), "size and free space of b's backing: {card}");
            // The charts need two reports ten seconds apart; wait for one sample at least.
            wait_until(&c, "a CPU sample", || async {
                c.execute(
                    "return document.querySelector('.node .chart polyline.cpu').getAttribute('points').length > 0;",
                    vec![],
                )
                .await
                .map(|v| v == json!(true))
                .unwrap_or(false)
            })
            .await;
            std::fs::write(shots.join("group.png"), c.screenshot().await.unwrap()).unwrap();

            // A POST without the CSRF token, from the page itself: 403, nothing queued.
            let status = page_fetch(
                &c,
                "POST",
                "/ui/api/groups/default/web/actions",
                json!({"action": "maintenance", "enabled": true}),
                false,
            )
            .await;
            assert_eq!(status, 403);

            // A switchover clicked in the page, confirmed in the dialog.
            c.find(Locator::Css("#action-switchover-b")).await.unwrap().click().await.unwrap();
            let text = wait_text(&c, "#confirm-text", |t| !t.is_empty(), "the confirmation").await;
            assert!(text.contains("No data is lost"), "{text}");
            c.find(Locator::Css("#confirm-ok")).await.unwrap().click().await.unwrap();
            wait_text(&c, "#active-node", |t| t == "b", "the switchover").await;
            wait_text(&c, "#action-result", |t| t.contains("Succeeded"), "the action's outcome").await;
            assert!(wait_for(UP, || (cli_active(&p)? == "b").then_some(())).is_some(), "the CLI does not see b active");

            // The active node dies: the page shows the failover without a reload.
            c.execute("window.hapairNoReload = 42;", vec![]).await.unwrap();
            p.power_off("b");
            wait_text(&c, "#active-node", |t| t == "a", "the failover").await;
            wait_text(&c, "#events tbody", |t| t.contains("ActiveNodeChanged"), "the failover in the timeline").await;
            assert_eq!(
                c.execute("return window.hapairNoReload;", vec![]).await.unwrap(),
                json!(42),
                "the page reloaded"
            );

            // The viewer: no action in the page, 403 from the API even with the CSRF token.
            c.find(Locator::Css("#sign-out")).await.unwrap().click().await.unwrap();
            wait_until(&c, "the sign-in page after signing out", || async { visible(&c, "sign-in").await }).await;
            sign_in(&c, &url, &viewer).await;
            wait_text(&c, "#groups tbody", |t| t.contains("default/web"), "the viewer's overview").await;
            c.goto(&format!("{url}/ui/#/group/default/web")).await.unwrap();
            wait_text(&c, "#actions", |t| t.contains("Viewer"), "the viewer's group page").await;
            assert!(c.find_all(Locator::Css("#actions button")).await.unwrap().is_empty(), "a viewer sees actions");
            let status = page_fetch(
                &c,
                "POST",
                "/ui/api/groups/default/web/actions",
                json!({"action": "maintenance", "enabled": true}),
                true,
            )
            .await;
            assert_eq!(status, 403);
            c.close().await.unwrap();
        });
    });
    driver.kill();
    let events = p.hapair(&["describe", "default/web", "-o", "json"]);
    assert!(
        events.contains(r#"requested by console user \"operator-tester\""#),
        "the audit event names the console user:\n{events}"
    );
    assert!(!events.contains("maintenance a-"), "a refused request left a trace:\n{events}");
}
