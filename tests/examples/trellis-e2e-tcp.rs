//! A tiny TCP tool the end-to-end suites run inside network namespaces, where
//! the test process itself cannot open sockets:
//!
//! - `trellis-e2e-tcp serve ADDR REPLY`: accept connections on ADDR forever;
//!   answer each with REPLY and a newline, then close it.
//! - `trellis-e2e-tcp echo ADDR`: accept connections on ADDR forever; send
//!   back every byte each one sends until it half-closes, then close it.
//! - `trellis-e2e-tcp probe ADDR [TIMEOUT_MS]`: connect (default timeout 5 s),
//!   print everything the server sends until it closes; exit 1 with the error
//!   on failure.
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

fn serve(addr: SocketAddr, reply: &str) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        // a failed write only affects that client
        let _ = stream.write_all(format!("{reply}\n").as_bytes());
    }
    Ok(())
}

fn echo(addr: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    println!("listening on {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            // a failed copy only affects that client
            let mut reader = &stream;
            let mut writer = &stream;
            if std::io::copy(&mut reader, &mut writer).is_ok() {
                let _ = stream.shutdown(std::net::Shutdown::Write);
            }
        });
    }
    Ok(())
}

fn probe(addr: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    stream.read_to_string(&mut out)?;
    Ok(out)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let parse = |s: &str| s.parse::<SocketAddr>().map_err(|e| format!("bad address {s:?}: {e}"));
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["serve", addr, reply] => parse(addr).and_then(|a| serve(a, reply).map_err(|e| format!("serve {a}: {e}"))),
        ["echo", addr] => parse(addr).and_then(|a| echo(a).map_err(|e| format!("echo {a}: {e}"))),
        ["probe", addr, rest @ ..] if rest.len() <= 1 => {
            let timeout = match rest.first() {
                Some(ms) => ms.parse().map(Duration::from_millis).map_err(|e| format!("bad timeout {ms:?}: {e}")),
                None => Ok(Duration::from_secs(5)),
            };
            timeout.and_then(|t| {
                parse(addr).and_then(|a| probe(a, t).map(|out| print!("{out}")).map_err(|e| format!("probe {a}: {e}")))
            })
        }
        _ => Err("usage: trellis-e2e-tcp serve ADDR REPLY | echo ADDR | probe ADDR [TIMEOUT_MS]".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-e2e-tcp: {e}");
            ExitCode::FAILURE
        }
    }
}
