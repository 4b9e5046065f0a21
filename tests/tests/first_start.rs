//! The first start of `trellis server`, as an operator meets it: printed
//! paths are absolute and work from any directory, the admin key is in a
//! 0600 file and never on stdout, the data directory is owner-only, a start
//! that fails on a busy port leaves nothing behind, and a lost admin key is
//! replaced with `trellis server reset-admin-key`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use trellis_e2e::{Cli, Proc, bins, wait_until};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

/// `trellis server --listen 127.0.0.1:0 --data-dir ./cp-data`, run from `work`.
fn spawn_server(name: &str, work: &Path) -> Proc {
    let mut cmd = Command::new(bins::trellis());
    cmd.current_dir(work).args(["server", "--listen", "127.0.0.1:0", "--data-dir", "./cp-data"]);
    Proc::spawn(name, cmd, &work.join("logs"))
}

/// Waits for the banner and returns the `export …` line it prints.
fn export_line(server: &mut Proc) -> String {
    server.wait_for_line("the export line", START_TIMEOUT, |l| {
        l.trim_start().starts_with("export TRELLIS_URL=").then(|| l.trim().to_string())
    })
}

/// The value of `VAR=value` in an `export` line.
fn var<'a>(line: &'a str, name: &str) -> &'a str {
    let start = line.find(&format!("{name}=")).unwrap_or_else(|| panic!("no {name} in {line}")) + name.len() + 1;
    line[start..].split_whitespace().next().unwrap()
}

#[test]
fn first_start_prints_absolute_paths_keeps_the_admin_key_off_stdout_and_locks_the_data_dir() {
    let work = tempfile::tempdir().expect("temp dir");
    let data = work.path().join("cp-data");

    // A busy port: the start fails with one line and creates nothing.
    let busy = TcpListener::bind(SocketAddr::new(LOCALHOST, 0)).expect("bind");
    let out = Command::new(bins::trellis())
        .current_dir(work.path())
        .args(["server", "--listen", &busy.local_addr().unwrap().to_string(), "--data-dir", "./cp-data"])
        .output()
        .expect("run trellis server");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot listen on"), "{stderr}");
    assert!(!data.exists(), "a failed start leaves no data directory behind");
    drop(busy);

    let mut server = spawn_server("server", work.path());
    let export = export_line(&mut server);
    let ca = var(&export, "TRELLIS_CA_CERT");
    assert_eq!(Path::new(ca), data.join("ca.pem"), "an absolute path: {export}");
    let key_file = data.join("admin.key");
    assert!(export.contains(&format!("TRELLIS_API_KEY=$(cat {})", key_file.display())), "{export}");
    let key = std::fs::read_to_string(&key_file).expect("admin.key").trim().to_string();
    let stdout = server.stdout();
    assert!(!server.output().contains(&key), "the admin key is not printed:\n{stdout}");
    assert!(stdout.contains(&format!("Admin API key   {}", key_file.display())), "{stdout}");

    assert_eq!(mode(&data), 0o700, "data directory");
    for file in ["trellis.db", "trellis.db-wal", "trellis.db-shm", "ca.key", "admin.key"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }

    // The printed export line works from another directory.
    let url = var(&export, "TRELLIS_URL");
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let admin = Cli::new(&bins::trellis(), url, Some(&key), Path::new(ca));
    let mut cmd = admin.command(&["account", "list", "--output", "json"]);
    let listed = cmd.current_dir(elsewhere.path()).output().expect("run the CLI");
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));

    // Lose the key, reset it while the server runs: the old key stops working, the new one works.
    std::fs::remove_file(&key_file).expect("remove admin.key");
    let reset = Command::new(bins::trellis())
        .args(["server", "reset-admin-key", "--data-dir"])
        .arg(&data)
        .output()
        .expect("run reset-admin-key");
    let said = String::from_utf8_lossy(&reset.stdout);
    assert!(reset.status.success(), "{said}{}", String::from_utf8_lossy(&reset.stderr));
    assert!(said.contains(&key_file.display().to_string()), "says where the new key is: {said}");
    let new_key = std::fs::read_to_string(&key_file).expect("the new admin.key").trim().to_string();
    assert!(!said.contains(&new_key), "and does not print it: {said}");
    assert_eq!(mode(&key_file), 0o600);
    let denied = admin.run(&["account", "list"]);
    assert!(!denied.success && denied.stderr.contains("401"), "the old key is refused: {}", denied.stderr);
    wait_until("the new admin key to work", START_TIMEOUT, || {
        admin.with_key(&new_key).run(&["account", "list"]).success.then_some(())
    });

    // A restart neither replaces the reset key nor prints it.
    server.stop();
    let mut again = spawn_server("server-again", work.path());
    export_line(&mut again);
    assert_eq!(std::fs::read_to_string(&key_file).unwrap().trim(), new_key);
    assert!(!again.output().contains(&new_key));
}
