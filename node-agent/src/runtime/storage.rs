//! Where a replica's data lives, for the report: the backing's kind and size, the free
//! space on the filesystem holding a file backing, and the block device under it with its
//! model, read from `stat`, `statvfs` and sysfs. Best effort: what cannot be read is left
//! out, never an error, since the report must go out whatever the disk says.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use hapair_crds::volume::{BackingKind, StorageReport};

/// What the node can tell about the backing at `path`, or `None` if it does not exist yet.
pub fn storage_report(path: &Path) -> Option<StorageReport> {
    storage_report_in(Path::new("/sys"), path)
}

fn storage_report_in(sys: &Path, path: &Path) -> Option<StorageReport> {
    let meta = std::fs::metadata(path).ok()?;
    let is_device = meta.file_type().is_block_device();
    // A file lives on the device of its filesystem; a device is its own.
    let dev = if is_device { meta.rdev() } else { meta.dev() };
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let block = sys.join("dev/block").join(format!("{major}:{minor}"));
    let device =
        std::fs::canonicalize(&block).ok().and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let size_bytes = if is_device {
        read_trimmed(&block.join("size")).and_then(|s| s.parse::<u64>().ok()).map_or(0, |sectors| sectors * 512)
    } else {
        meta.len()
    };
    let filesystem_free_bytes = (!is_device)
        .then(|| nix::sys::statvfs::statvfs(path).ok())
        .flatten()
        .map(|v| v.blocks_available().saturating_mul(v.fragment_size()));
    Some(StorageReport {
        path: path.display().to_string(),
        kind: if is_device { BackingKind::BlockDevice } else { BackingKind::File },
        size_bytes,
        filesystem_free_bytes,
        device,
        device_model: device_model(&block),
    })
}

/// The model of the disk a block device (or the partition) is on: `device/model` of the
/// device, or of its parent for a partition. Virtual devices (loop, device-mapper) have none.
fn device_model(block: &Path) -> Option<String> {
    let own = block.join("device/model");
    let parent = block.join("../device/model");
    [own, parent].iter().find_map(|p| read_trimmed(p)).filter(|m| !m.is_empty())
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_file_backing_reports_its_size_free_space_and_device() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.img");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(64 << 20).unwrap();
        let report = storage_report(&path).unwrap();
        assert_eq!(report.kind, BackingKind::File);
        assert_eq!(report.size_bytes, 64 << 20);
        assert!(report.filesystem_free_bytes.is_some_and(|f| f > 0), "{report:?}");
        assert_eq!(report.path, path.display().to_string());
        assert!(storage_report(&dir.path().join("missing.img")).is_none());
    }

    #[test]
    fn a_device_reads_its_size_and_model_from_sysfs() {
        // A fake sysfs: /dev/null is a character device, so use the device of the temp
        // directory's filesystem through a file, and build the sysfs entries for it.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let dev = std::fs::metadata(&path).unwrap().dev();
        let sys = tempfile::tempdir().unwrap();
        let disk = sys.path().join("devices/virtio0/block/vdz");
        let part = disk.join("vdz1");
        std::fs::create_dir_all(&part).unwrap();
        std::fs::create_dir_all(disk.join("device")).unwrap();
        std::fs::write(disk.join("device/model"), "QEMU HARDDISK   \n").unwrap();
        std::fs::create_dir_all(sys.path().join("dev/block")).unwrap();
        let link = sys.path().join(format!("dev/block/{}:{}", libc::major(dev), libc::minor(dev)));
        std::os::unix::fs::symlink(&part, &link).unwrap();
        let report = storage_report_in(sys.path(), &path).unwrap();
        assert_eq!(report.device.as_deref(), Some("vdz1"));
        assert_eq!(report.device_model.as_deref(), Some("QEMU HARDDISK"), "a partition takes its disk's model");
    }
}
