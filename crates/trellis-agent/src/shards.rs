//! Data-plane threads: one single-threaded runtime per thread, so that a
//! connection and everything it moves stay on one thread.
//!
//! On a multi-threaded runtime a flow's tasks (its tunnel connection's
//! driver, the flow's own task, the accept that started it) run on whichever
//! worker is free, and the runtime wakes one worker from another to share the
//! work: on a machine whose cores are busy with other processes that costs a
//! futex wake and a cold cache per hand-over, about a sixth of the CPU per
//! byte moved in our measurements (docs/performance.md, "Data-plane
//! threads"). Here every thread
//! runs a runtime of its own and accepts on a listener of its own (the
//! kernel spreads new connections over them with `SO_REUSEPORT`); a
//! connection accepted on a thread is served there, a tunnel connection is
//! driven there, and the endpoint opens a flow on a tunnel connection of its
//! own thread when there is one (see `endpoint::pool`). Nothing crosses
//! threads on the way of a flow's bytes.
//!
//! With one thread ([`Shards::inline`]) the data plane runs on the caller's
//! runtime, as everything else does; that is what most tests and `trellis
//! dev` use (`trellis agent` runs one thread per CPU, at most 8).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

thread_local! {
    /// The index of the data-plane thread this is (0 on any other thread).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// The data-plane threads of an agent. Cloning shares them.
#[derive(Clone)]
pub struct Shards {
    inner: Arc<Inner>,
}

struct Inner {
    handles: Vec<Handle>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: CancellationToken,
}

impl Shards {
    /// One shard: the runtime of the caller (which must be inside one).
    pub fn inline() -> Self {
        Self::from_parts(vec![Handle::current()], Vec::new(), CancellationToken::new())
    }

    /// `n` threads, each running a runtime of its own until [`Shards::stop`];
    /// [`Shards::inline`] when `n` is 1 (or 0).
    pub fn start(n: usize) -> io::Result<Self> {
        if n <= 1 {
            return Ok(Self::inline());
        }
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for index in 0..n {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let spawned = std::thread::Builder::new().name(format!("trellis-dp-{index}")).spawn(move || {
                SHARD.with(|s| s.set(index));
                runtime.block_on(stopped.cancelled());
                // Dropping the runtime drops the tasks still on it.
                drop(runtime);
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    stop.cancel();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(e);
                }
            }
        }
        Ok(Self::from_parts(handles, threads, stop))
    }

    fn from_parts(handles: Vec<Handle>, threads: Vec<JoinHandle<()>>, stop: CancellationToken) -> Self {
        Self { inner: Arc::new(Inner { handles, threads: Mutex::new(threads), stop }) }
    }

    /// How many there are (at least 1).
    pub fn len(&self) -> usize {
        self.inner.handles.len()
    }

    /// Never: there is at least one shard.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The shard of the calling thread: its index on a data-plane thread, 0 elsewhere.
    pub fn current(&self) -> usize {
        SHARD.with(Cell::get).min(self.len() - 1)
    }

    /// Runs `task` on shard `index`, tracked by `tracker`.
    pub fn spawn<F>(&self, index: usize, tracker: &TaskTracker, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.inner.handles[index % self.len()].spawn(tracker.track_future(task))
    }

    /// Ends the threads (the tasks still on them are dropped) and waits for
    /// them. Call it once the data plane's tasks are done.
    pub async fn stop(&self) {
        self.inner.stop.cancel();
        let threads = std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        if threads.is_empty() {
            return;
        }
        let joined = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for Inner {
    /// The threads end with the last handle (an agent that failed to start
    /// after starting them leaves none behind). Not joined here: the last
    /// handle may be dropped on one of them.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Listening sockets on `addr`, one per shard, sharing the address with
/// `SO_REUSEPORT` when there is more than one (the kernel spreads new
/// connections over them). Port 0 picks one port for all. Accepted sockets
/// inherit `nodelay`. Returned as std sockets (non-blocking) for each shard
/// to register with its own runtime.
///
/// A port another process listens on is refused ("address in use") as
/// without `SO_REUSEPORT`, even when that process set it too (a second agent
/// of the same user would otherwise share the port silently and take half
/// the connections).
pub fn bind_listeners(addr: SocketAddr, n: usize, nodelay: bool) -> io::Result<Vec<std::net::TcpListener>> {
    let n = n.max(1);
    let socket = || {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking().cloexec(), Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        io::Result::Ok(socket)
    };
    if n > 1 && addr.port() != 0 {
        // Without SO_REUSEPORT this bind fails on any listener of the port.
        socket()?.bind(&addr.into())?;
    }
    let mut listeners = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let socket = socket()?;
        if n > 1 {
            socket.set_reuse_port(true)?;
        }
        if nodelay {
            socket.set_tcp_nodelay(true)?;
        }
        socket.bind(&at.into())?;
        socket.listen(1024)?;
        let listener = std::net::TcpListener::from(socket);
        at = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn listeners_of_all_shards_share_one_port_and_each_serves_on_its_own_thread() {
        let shards = Shards::start(2).unwrap();
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 2, true).unwrap();
        let addr = listeners[0].local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        assert!(listeners.iter().all(|l| l.local_addr().unwrap() == addr), "one port for all");
        let tracker = TaskTracker::new();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
        for (index, listener) in listeners.into_iter().enumerate() {
            let seen_tx = seen_tx.clone();
            shards.spawn(index, &tracker, async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (socket, _) = listener.accept().await.unwrap();
                    assert!(socket.nodelay().unwrap());
                    let thread = std::thread::current().name().unwrap_or_default().to_string();
                    seen_tx.send((index, SHARD.with(Cell::get), thread)).unwrap();
                }
            });
        }
        let mut threads = std::collections::HashSet::new();
        let mut clients = Vec::new();
        for _ in 0..64 {
            clients.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (index, shard, thread) = seen.recv().await.unwrap();
            assert_eq!(index, shard, "a listener's connections are served on its shard");
            assert_eq!(thread, format!("trellis-dp-{index}"));
            threads.insert(thread);
        }
        assert_eq!(threads.len(), 2, "the kernel spread 64 connections over both listeners");
        assert_eq!(shards.current(), 0, "a thread that is no shard counts as the first");
        shards.stop().await;
        assert!(shards.inner.threads.lock().unwrap().is_empty());
    }

    #[test]
    fn a_port_another_group_listens_on_is_refused_though_both_set_reuseport() {
        let first = bind_listeners("127.0.0.1:0".parse().unwrap(), 2, false).unwrap();
        let taken = first[0].local_addr().unwrap();
        for n in [1, 2, 4] {
            let err = bind_listeners(taken, n, false).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{n} sockets: {err}");
        }
        drop(first);
        assert_eq!(bind_listeners(taken, 2, false).unwrap().len(), 2, "free again once the first group closed");
    }

    #[tokio::test]
    async fn one_shard_is_the_callers_runtime_and_binds_without_reuseport() {
        let shards = Shards::start(1).unwrap();
        assert_eq!(shards.len(), 1);
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 1, false).unwrap();
        // Without SO_REUSEPORT a second socket cannot take the port.
        let taken = listeners[0].local_addr().unwrap();
        let again = bind_listeners(taken, 2, false);
        assert!(again.is_err(), "a port held without SO_REUSEPORT is not shared");
        let tracker = TaskTracker::new();
        assert_eq!(shards.spawn(0, &tracker, async { 7 }).await.unwrap(), 7);
        shards.stop().await;
    }
}
