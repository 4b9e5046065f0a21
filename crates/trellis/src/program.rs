//! How printed commands name this program, so that they run as printed:
//! `trellis` when that name on `PATH` is this very binary, else the binary's
//! absolute path (after `cargo run`, `trellis` is usually not on `PATH`).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

/// The word that starts a printed `trellis …` command line, shell-quoted.
pub fn command_name() -> String {
    match std::env::current_exe() {
        Ok(exe) => command_name_for(&exe, std::env::var_os("PATH").as_deref()),
        Err(_) => "trellis".to_string(),
    }
}

/// [`command_name`] for the binary `exe` and the search path `path_var`.
pub fn command_name_for(exe: &Path, path_var: Option<&OsStr>) -> String {
    let exe = canonical(exe);
    let on_path = path_var
        .map(|p| std::env::split_paths(p).map(|dir| dir.join("trellis")).find(|c| is_executable(c)))
        .unwrap_or_default();
    match on_path {
        Some(found) if canonical(&found) == exe => "trellis".to_string(),
        _ => shell_quote(&exe),
    }
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `path` as one shell word: unchanged when it holds only safe characters, else in single quotes.
pub fn shell_quote(path: &Path) -> String {
    let s = path.display().to_string();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+:@,=".contains(&b)) {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn executable(path: &Path) {
        std::fs::write(path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn the_plain_name_only_when_path_finds_this_binary() {
        let dir = tempfile::tempdir().unwrap();
        let build = dir.path().join("target/release");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&build).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        let exe = build.join("trellis");
        executable(&exe);

        // Not on PATH (the `cargo run` case): the absolute path.
        let path = std::env::join_paths([&bin]).unwrap();
        assert_eq!(command_name_for(&exe, Some(&path)), exe.display().to_string());
        assert_eq!(command_name_for(&exe, None), exe.display().to_string());

        // Another `trellis` on PATH: still the absolute path of this one.
        executable(&bin.join("trellis"));
        assert_eq!(command_name_for(&exe, Some(&path)), exe.display().to_string());

        // PATH finds this binary (here through a symlink): the plain name.
        std::fs::remove_file(bin.join("trellis")).unwrap();
        std::os::unix::fs::symlink(&exe, bin.join("trellis")).unwrap();
        assert_eq!(command_name_for(&exe, Some(&path)), "trellis");
    }

    #[test]
    fn paths_with_spaces_are_quoted_for_the_shell() {
        assert_eq!(shell_quote(Path::new("/tmp/a b/ca.pem")), "'/tmp/a b/ca.pem'");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
        assert_eq!(shell_quote(Path::new("/tmp/trellis-dev-x1/ca.pem")), "/tmp/trellis-dev-x1/ca.pem");
    }
}
