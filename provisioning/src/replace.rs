//! Files written whole or not at all: a temporary file beside the one it
//! replaces, synced, then renamed over it and the directory synced. A full
//! disk or an error part-way leaves the old file (or none) as it was,
//! never an empty or cut-short one.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;

/// A file's replacement, written and synced, not yet in place.
#[derive(Debug)]
pub struct Replacement {
    tmp: NamedTempFile,
    target: PathBuf,
}

impl Replacement {
    /// Writes `bytes` to a temporary file beside the file `path` names (a
    /// symbolic link is followed: the file it names is replaced and the
    /// link stays), with that file's mode, owner and group, or `new_mode`
    /// when there is no such file yet.
    pub fn write(path: &Path, bytes: &[u8], new_mode: u32) -> std::io::Result<Replacement> {
        let old = std::fs::metadata(path).ok();
        let target = target_of(path)?;
        let dir = dir_of(&target);
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("file");
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}-"))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        let file = tmp.as_file();
        match &old {
            // The group matters most: svsd reads /etc/svs files through
            // group svs, and a root-owned copy would shut it out.
            Some(m) => {
                let (uid, gid) = (m.uid(), m.gid());
                let current = file.metadata()?;
                if (current.uid(), current.gid()) != (uid, gid) {
                    rustix::fs::fchown(
                        file,
                        Some(rustix::fs::Uid::from_raw(uid)),
                        Some(rustix::fs::Gid::from_raw(gid)),
                    )?;
                }
                file.set_permissions(m.permissions())?;
            }
            None => file.set_permissions(std::fs::Permissions::from_mode(new_mode))?,
        }
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        Ok(Replacement { tmp, target })
    }

    /// Where the replacement is until [`Replacement::commit`], to read it back.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Renames the replacement over the file and syncs the directory.
    pub fn commit(self) -> std::io::Result<()> {
        let target = self.target;
        self.tmp.persist(&target).map_err(|e| e.error)?;
        std::fs::File::open(dir_of(&target))?.sync_all()
    }

    /// Whether a replacement of `path` could be written: its directory
    /// exists and takes a new file (tried, as permissions, ACLs and
    /// read-only mounts all decide). Lets a command refuse before work it
    /// would otherwise throw away, such as a signature made in the token.
    pub fn check(path: &Path) -> std::io::Result<()> {
        tempfile::Builder::new()
            .prefix(".svs-provision-check-")
            .tempfile_in(dir_of(&target_of(path)?))
            .map(drop)
    }
}

/// The file a replacement of `path` replaces: a symbolic link is followed.
fn target_of(path: &Path) -> std::io::Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(_) => std::fs::canonicalize(path),
        Err(_) => Ok(path.to_path_buf()),
    }
}

/// The directory holding `target`.
fn dir_of(target: &Path) -> &Path {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_replacement_keeps_the_link_and_the_mode_and_changes_nothing_until_committed() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real.toml");
        std::fs::write(&real, "old").unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&real, &link).unwrap();

        let r = Replacement::write(&link, b"new", 0o600).unwrap();
        assert_eq!(std::fs::read_to_string(r.path()).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "old");
        drop(r);
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "old");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "no temporary left"
        );

        Replacement::write(&link, b"new", 0o600)
            .unwrap()
            .commit()
            .unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read_to_string(&real).unwrap(), "new");
        let mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);

        // The group (and owner) stay: as root, one other than ours.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&real, Some(0), Some(65534)).unwrap();
            Replacement::write(&link, b"newer", 0o600)
                .unwrap()
                .commit()
                .unwrap();
            let m = std::fs::metadata(&real).unwrap();
            assert_eq!((m.uid(), m.gid()), (0, 65534));
        }

        let fresh = dir.path().join("fresh.pem");
        Replacement::write(&fresh, b"x", 0o644)
            .unwrap()
            .commit()
            .unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    #[test]
    fn a_check_finds_a_missing_directory_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        Replacement::check(&dir.path().join("new.csr")).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let e = Replacement::check(&dir.path().join("nodir/new.csr")).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
    }
}
