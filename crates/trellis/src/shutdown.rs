//! Ctrl-C and SIGTERM, as one future; a second one cuts a graceful stop short.

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

/// Runs `stop` (a graceful shutdown) unless another Ctrl-C or SIGTERM comes first.
pub async fn gracefully(what: &str, stop: impl std::future::Future<Output = ()>) {
    tokio::select! {
        () = stop => {}
        () = signal() => tracing::warn!("second signal: exiting without waiting for the {what} to stop"),
    }
}
