//! Finding the binaries the suites run: the `trellis` binary built from this
//! workspace and the small TCP helper example of this crate.
//!
//! Cargo only tells integration tests where the binaries of their *own*
//! package are, so both are looked up next to the running test executable
//! (`target/<profile>/deps/<test>` → `target/<profile>/<bin>`).

use std::path::PathBuf;

/// The `trellis` binary: `$TRELLIS_BIN` if set, else `target/<profile>/trellis`.
pub fn trellis() -> PathBuf {
    if let Some(path) = std::env::var_os("TRELLIS_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "TRELLIS_BIN={} does not name a file", path.display());
        return path;
    }
    in_target_dir("trellis", "cargo build -p trellis")
}

/// The `trellis-e2e-tcp` helper (a tiny TCP server/probe run inside
/// namespaces), built as an example of this crate.
pub fn tcp_helper() -> PathBuf {
    in_target_dir("examples/trellis-e2e-tcp", "cargo build -p trellis-e2e --examples")
}

fn in_target_dir(name: &str, build_hint: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running test executable");
    let mut dir = exe.parent().expect("the test executable lives in a directory").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "the `{name}` binary is missing at {}: build it first with `{build_hint}` (scripts/test does this)",
        path.display()
    );
    path
}
