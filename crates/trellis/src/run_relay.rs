//! `trellis relay`: runs a relay until Ctrl-C or SIGTERM.

use anyhow::{Context, Result};
use trellis_agent::AccessLog;
use trellis_agent::relay::RelayOptions;

use crate::cli::RelayRunArgs;

/// Runs `trellis relay` until a signal.
pub async fn run(args: RelayRunArgs) -> Result<()> {
    let missing = |flag: &str, env: &str| anyhow::anyhow!("`trellis relay` needs --{flag} (or {env})");
    let control_plane = args.control_plane.ok_or_else(|| missing("control-plane", "TRELLIS_CONTROL_PLANE"))?;
    let state_dir = args.state_dir.ok_or_else(|| missing("state-dir", "TRELLIS_STATE_DIR"))?;
    let advertise = args.advertise.ok_or_else(|| missing("advertise", "TRELLIS_ADVERTISE"))?;
    let access_log = if args.access_log.as_os_str() == "-" {
        AccessLog::stdout()
    } else {
        AccessLog::append_to(&args.access_log)
            .with_context(|| format!("opening the access log {} (--access-log)", args.access_log.display()))?
    };
    let shown_dir = state_dir.display().to_string();
    let options = RelayOptions {
        control_plane: control_plane.to_string(),
        join_token: args.join_token.map(|t| t.to_string()),
        state_dir,
        listen: args.listen,
        advertise,
        metrics_listen: args.metrics_listen,
        access_log: access_log.clone(),
        report_interval: args.report_interval,
    };
    let relay = trellis_agent::relay::start(options)
        .await
        .with_context(|| format!("starting the relay with state in {shown_dir}"))?;
    tracing::info!(
        relay_id = relay.relay_id(),
        listen = %relay.local_addr(),
        metrics = ?relay.metrics_addr(),
        "relay running"
    );
    let _reopen = tokio::spawn(crate::run_agent::reopen_on_sighup(access_log.clone()));
    let outcome = tokio::select! {
        () = crate::shutdown::signal() => {
            tracing::info!("shutting down (Ctrl-C again to exit at once)");
            Ok(())
        }
        () = relay.stopped() => Err(anyhow::anyhow!("the relay listener stopped")),
    };
    crate::shutdown::gracefully("relay", relay.shutdown()).await;
    // The last connections' lines (written by a thread of their own) reach the log before exit,
    // unless the log stopped taking lines (a stdout pipe nobody drains): then the relay exits anyway.
    if !access_log.flush(std::time::Duration::from_secs(5)) {
        tracing::warn!("the access log did not take its last lines within 5 s; exiting without them");
    }
    outcome
}
