//! The control plane's data directory: the store, the CA's key and the admin
//! key, readable by the owner only.
//!
//! The directory is 0700 and the SQLite files 0600 whatever the umask: a new
//! database file is created 0600 before SQLite opens it (SQLite gives its
//! `-wal` and `-shm` files the database file's mode), and a directory or file
//! left looser by an older version or by hand is tightened at start, with a
//! log line. This module never deletes or rewrites contents.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the data directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the database and its `-wal` / `-shm` files.
pub const FILE_MODE: u32 = 0o600;

/// A data-directory failure: what was being done, to which path.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct DataDirError {
    pub action: &'static str,
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

fn fail<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> DataDirError + 'a {
    move |source| DataDirError { action, path: path.to_path_buf(), source }
}

/// `dir` as an absolute path (not resolving symlinks), so that printed paths work from any directory.
pub fn absolute(dir: &Path) -> Result<PathBuf, DataDirError> {
    std::path::absolute(dir).map_err(fail("resolve", dir))
}

/// Creates `dir` (and missing parents) with mode 0700, or tightens an existing one to 0700.
pub fn prepare(dir: &Path) -> Result<(), DataDirError> {
    match fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => {
            return Err(DataDirError {
                action: "use",
                path: dir.to_path_buf(),
                source: io::Error::new(io::ErrorKind::NotADirectory, "it is not a directory"),
            });
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir).map_err(fail("create", dir))?;
        }
        Err(e) => return Err(fail("read", dir)(e)),
    }
    tighten(dir, DIR_MODE, "data directory")
}

/// Sets `path`'s permission bits to `mode` when any other bit is set (the
/// umask may have made it looser, or an older version did), logging the change.
fn tighten(path: &Path, mode: u32, what: &str) -> Result<(), DataDirError> {
    let current = fs::metadata(path).map_err(fail("read", path))?.permissions().mode() & 0o777;
    if current == mode {
        return Ok(());
    }
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(fail("change the mode of", path))?;
    if current & !mode != 0 {
        tracing::warn!(path = %path.display(), "tightened the {what} from {current:o} to {mode:o}");
    }
    Ok(())
}

/// Makes the SQLite database `db` and its `-wal` / `-shm` files owner-only:
/// creates an empty 0600 database file when none exists (SQLite takes an empty
/// file as a new database), and tightens the existing ones.
pub fn secure_database(db: &Path) -> Result<(), DataDirError> {
    match fs::OpenOptions::new().write(true).create_new(true).mode(FILE_MODE).open(db) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(fail("create", db)(e)),
    }
    tighten(db, FILE_MODE, "database file")?;
    for suffix in ["-wal", "-shm"] {
        let mut name = db.as_os_str().to_owned();
        name.push(suffix);
        let side = PathBuf::from(name);
        if side.exists() {
            tighten(&side, FILE_MODE, "database file")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_new_data_directory_is_owner_only_and_an_old_one_is_tightened() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        let file = tmp.path().join("file");
        fs::write(&file, "").unwrap();
        assert!(prepare(&file).unwrap_err().to_string().contains("not a directory"));
    }

    #[test]
    fn database_files_are_owner_only() {
        let tmp = tempfile::tempdir().unwrap();
        let db = tmp.path().join("trellis.db");
        secure_database(&db).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(fs::metadata(&db).unwrap().len(), 0, "an empty file SQLite takes as a new database");

        let wal = tmp.path().join("trellis.db-wal");
        fs::write(&wal, "").unwrap();
        fs::set_permissions(&wal, fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).unwrap();
        secure_database(&db).unwrap();
        assert_eq!((mode(&db), mode(&wal)), (0o600, 0o600));
    }
}
