//! Many flows over one tunnel connection (stream protocol version 2, see
//! `trellis_proto::mux`): the I/O side.
//!
//! A [`MuxConnection`] is a handle on one tunnel connection, generic over its
//! byte stream (direct TLS, or TLS inside a relay's stream): [`run`] drives it
//! (one task per connection reads and writes the stream), and each flow is a
//! [`MuxStream`], an `AsyncRead + AsyncWrite` that the copy loop splices like
//! a socket. The endpoint side [`MuxConnection::open`]s flows; the gateway
//! side [`MuxConnection::accept`]s them and answers each with
//! [`MuxStream::respond`]. A gateway that tries to open is answered with a
//! reset of that flow.
//!
//! The agents' flows are *attached* ([`MuxStream::attach`]): once a flow is
//! open, its local socket (the client's connection on the endpoint side, the
//! target's on the gateway side) is handed to the connection's driver, which
//! moves the bytes itself. It reads the socket straight into the out queue
//! as DATA frames, and writes received DATA bodies to the socket straight
//! from the stream's buffer (the TLS plaintext; only what the socket does not
//! take is queued). A flow's bytes therefore cross no task boundary and no
//! extra buffer on either agent; the flow's task only follows it
//! ([`MuxStream::poll_attached`]: byte counts, the end, a failure) and
//! stops it on revocation. Flows read and written as `AsyncRead +
//! AsyncWrite` (paced flows, tests) work as before.
//!
//! Memory: an idle flow holds a few hundred bytes of state here and no buffer.
//! Bytes a flow received and its reader has not taken yet are held per flow,
//! at most its receive window (the peer's credit; a peer that sends more has
//! that flow reset), appended into chunks of up to 64 KiB so that memory
//! follows the payload however small the frames. A window starts at
//! [`INITIAL_WINDOW`] and grows (see [`Flow::grant`]) up to
//! [`MAX_FLOW_WINDOW`] while the window, not the reader, limits the flow,
//! out of a per-connection [`GROWTH_POOL`]; the windows of a connection
//! together never exceed [`CONN_BUFFER_CAP`], so slow readers never stop a
//! connection from reading its other flows. Bytes waiting to be written are held per connection:
//! writers wait while more than [`OUT_HIGH`] are queued, and the connection
//! stops reading while more than [`OUT_LIMIT`] of control frames are (what
//! it answers by itself, resets and refusals, stays bounded when the peer
//! does not read). Every error one frame can carry resets that frame's flow
//! only.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BufMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use trellis_proto::mux::{
    self, Control, FRAME_HEADER_LEN, INITIAL_WINDOW, MAX_DATA_LEN, MAX_FLOWS_PER_CONNECTION, MAX_WINDOW, Preface,
};
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};

/// What the driver offers a read from an attached flow's local socket
/// unless the last one filled its offer: the out queue grows by what
/// requests need, a whole frame only for bulk.
const SMALL_READ: usize = 4 * 1024;
/// Writers wait while the connection has more than this queued for the stream.
pub const OUT_HIGH: usize = 256 * 1024;
/// What the out queue holds at most while the driver fills it with DATA
/// (it stops at [`OUT_HIGH`], after a frame of up to [`MAX_DATA_LEN`]): the
/// capacity of a busy connection's out buffers (see [`out_room`]).
const OUT_CAP: usize = OUT_HIGH + FRAME_HEADER_LEN + MAX_DATA_LEN;
/// An out buffer this small stays with an idle connection.
const OUT_KEEP: usize = 4 * 1024;
/// An out queue that would hold more than this takes a whole buffer of
/// [`OUT_CAP`]; below it (requests and answers, read [`SMALL_READ`] at a
/// time, and control frames) it grows as a `Vec` does.
const OUT_WHOLE_AT: usize = 16 * 1024;
/// Out buffers of [`OUT_CAP`] a thread keeps for its connections.
const MAX_SPARE_OUT: usize = 4;
/// Unread bytes all flows of a connection may hold: the most the receive
/// windows of its flows add up to, so slow readers alone never make the
/// connection stop reading (a connection past it, which the windows rule
/// out, stops reading).
pub const CONN_BUFFER_CAP: usize = 32 * 1024 * 1024;
/// What the most flows a connection carries reserve at their initial window.
const BASE_RESERVATION: usize = MAX_FLOWS_PER_CONNECTION * INITIAL_WINDOW as usize;
const _: () = assert!(BASE_RESERVATION <= CONN_BUFFER_CAP);
/// What the windows of a connection's flows may grow by, together, beyond
/// their initial windows: a flow that opens always gets its initial window.
pub const GROWTH_POOL: usize = CONN_BUFFER_CAP - BASE_RESERVATION;
/// The most one flow's receive window grows to. One window per round trip:
/// 8 MiB carries 800 MiB/s at 10 ms and 160 MiB/s at 50 ms (across
/// continents); two flows at it take the whole [`GROWTH_POOL`]. The peer
/// takes credit up to [`MAX_WINDOW`], which must not be less.
pub const MAX_FLOW_WINDOW: u32 = 8 * 1024 * 1024;
const _: () = assert!(MAX_FLOW_WINDOW as u64 <= MAX_WINDOW && MAX_FLOW_WINDOW as usize <= GROWTH_POOL);
/// The connection stops reading while more than this of control frames
/// (everything but DATA) waits to be written: what it answers by itself
/// (resets, refusals, window updates) stays bounded when the peer does not
/// read. DATA does not count: writers already wait at [`OUT_HIGH`], and two
/// agents sending bulk data both ways must never both stop reading.
pub const OUT_LIMIT: usize = 2 * OUT_HIGH;
/// Received bytes of a flow are kept in chunks of at most this size: small
/// frames are appended to the last chunk, so memory follows the payload.
const CHUNK: usize = MAX_DATA_LEN;
/// A piece of received bytes this large gets a whole chunk (see [`push_chunk`]).
const BULK: usize = 8 * 1024;
/// A reader grants its bytes back to the peer once it has read this many.
const WINDOW_UPDATE_AT: u32 = INITIAL_WINDOW / 4;
/// What the driver copies out of the stream to parse it: a frame header and
/// a control frame's body (DATA bodies go from the stream's buffer straight
/// to their flow), or a version-1 peer's answer.
const RX_BUF: usize = FRAME_HEADER_LEN + mux::MAX_CONTROL_LEN + trellis_proto::stream::MAX_FRAME_LEN;
/// Buffers of received plaintext (a TLS record each, up to 16 KiB) the
/// driver takes in one poll before it lets other tasks run.
const READS_PER_POLL: usize = 64;

/// Which end of the tunnel this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The consumer side: opens flows.
    Endpoint,
    /// The resource side: accepts flows, never opens.
    Gateway,
}

/// A handle on one tunnel connection. Cloning it does not clone the connection.
#[derive(Clone)]
pub struct MuxConnection {
    shared: Arc<Shared>,
}

struct Shared {
    side: Side,
    state: Mutex<State>,
}

/// Hashes flow ids for the connection's table. The driver looks up every
/// attached flow on every poll, where SipHash cost more than the lookup; a
/// multiplicative hash suffices because a connection holds at most
/// [`MAX_FLOWS_PER_CONNECTION`] flows, so ids a peer picks to collide make
/// a chain of at most that many.
#[derive(Default)]
struct FlowIdHasher(u64);

impl Hasher for FlowIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, id: u32) {
        // Fibonacci hashing: spreads sequential ids over the high bits hashbrown uses too.
        self.0 = (self.0 ^ u64::from(id)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

#[derive(Default)]
struct State {
    /// Boxed: the table's slots stay small (a table keeps about twice the
    /// slots of its entries), the state of a flow is allocated once.
    flows: HashMap<u32, Box<Flow>, BuildHasherDefault<FlowIdHasher>>,
    /// Encoded frames for the driver to write.
    out: Vec<u8>,
    /// Bytes of `out` that are DATA frames (the rest is control frames).
    out_data: usize,
    driver: Option<Waker>,
    /// Writers waiting for `out` to drain below `OUT_HIGH`.
    out_waiters: Vec<Waker>,
    /// The connection is gone; why.
    closed: Option<Arc<io::Error>>,
    /// No new flows; close once the last flow is gone.
    draining: bool,
    /// Endpoint: close once the last flow is gone, after the first one (new flows are taken meanwhile).
    close_when_idle: bool,
    /// Close now (after writing what is queued).
    closing: bool,
    /// Endpoint: the next flow id. Gateway: the highest id opened so far.
    ids: u32,
    /// Gateway: opened flows not yet accepted.
    accepted: VecDeque<(u32, OpenRequest)>,
    acceptor: Option<Waker>,
    /// Unread bytes held by all flows.
    buffered: usize,
    /// What the flows' windows grew by, and the round trip they grow against.
    pool: Pool,
    /// Attached flows whose local socket the driver must write to (bytes
    /// queued while it pushed back, or a FIN to pass on).
    attention: Vec<u32>,
    /// Attached flows whose local socket the driver reads, in the order it takes turns.
    attached: Vec<u32>,
    /// The peer's version-2 preface arrived.
    greeted: bool,
    greeter: Option<Waker>,
    /// The capacity of the driver's buffer of frames being written, when it last wrote everything (for tests).
    #[cfg(test)]
    writing_capacity: usize,
}

#[derive(Default)]
struct Flow {
    inbound: VecDeque<Vec<u8>>,
    /// How much of `inbound`'s front has been read.
    front_read: usize,
    buffered: usize,
    /// Bytes the peer may still send before it needs a WINDOW.
    allowance: u64,
    /// The receive window: what the peer may have unread, unacked or in
    /// flight (`allowance + buffered + unacked`).
    window: u32,
    /// Bytes granted back since the window last had a chance to grow, and since when.
    epoch_granted: u64,
    epoch: Option<Instant>,
    /// At a grant of this epoch, the reader had caught up (at most [`WINDOW_UPDATE_AT`] unread).
    caught_up: bool,
    /// A round-trip probe: bytes the peer may still send without the grant
    /// sent at this instant; the first byte beyond them answers it.
    probe: Option<(u64, Instant)>,
    /// Bytes read but not yet granted back.
    unacked: u32,
    /// Bytes this side may still send.
    credit: u64,
    recv_fin: bool,
    sent_fin: bool,
    reset: bool,
    response: Option<OpenResponse>,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// Attached (see [`MuxStream::attach`]): the local socket the driver
    /// reads what the flow sends from, and writes what it receives to.
    local: Option<Arc<TcpStream>>,
    /// Counts the bytes read from the local socket and written to it.
    counters: Option<Box<dyn Counters>>,
    /// The last read from the local socket filled what it offered: the next offers a whole frame.
    bulk: bool,
    /// The local socket's write half was shut down: the peer's FIN passed on after every byte.
    sink_shut: bool,
    /// Why the local socket failed (the flow is reset).
    local_failed: Option<Box<(io::ErrorKind, String)>>,
    /// In `State::attention`: the driver writes what the flow holds once it
    /// is done reading (or once the local socket takes bytes again).
    attended: bool,
    /// The flow's task, following the driver's writes to the sink.
    watcher: Option<Waker>,
}

impl Flow {
    fn new() -> Self {
        Self {
            allowance: u64::from(INITIAL_WINDOW),
            window: INITIAL_WINDOW,
            credit: u64::from(INITIAL_WINDOW),
            ..Self::default()
        }
    }

    /// `len` bytes of DATA arrived (within the allowance): answers the
    /// round-trip probe once they go beyond what the peer could send without
    /// the probe's grant.
    fn received(&mut self, len: usize, pool: &mut Pool, now: impl Fn() -> Instant) {
        self.allowance -= len as u64;
        if let Some((before, sent)) = &mut self.probe {
            if len as u64 > *before {
                let rtt = now().saturating_duration_since(*sent);
                pool.min_rtt = Some(pool.min_rtt.map_or(rtt, |m| m.min(rtt)));
                self.probe = None;
            } else {
                *before -= len as u64;
            }
        }
    }

    /// The reader took bytes: the WINDOW to send, if one is due. It grants
    /// back what was read, and doubles the window (within
    /// [`MAX_FLOW_WINDOW`] and what is left of the pool) when the window,
    /// not the reader, limits the flow: a whole window was granted back
    /// within two round trips (the flow moves at least half a window per
    /// round trip; a window of about twice the bandwidth-delay product ends
    /// the growth), and at one of those grants the reader had caught up (at
    /// most [`WINDOW_UPDATE_AT`] unread). A slow reader, whose bytes wait
    /// unread, never grows its window. The round trip is the shortest one
    /// the connection measured from a grant to the first byte that needed it
    /// (see [`Flow::received`]; never less than the real one); until one is
    /// known no window grows.
    fn grant(&mut self, pool: &mut Pool, now: impl Fn() -> Instant) -> Option<u32> {
        if self.unacked < WINDOW_UPDATE_AT || self.recv_fin {
            return None;
        }
        let now = now();
        let mut more = self.unacked;
        self.unacked = 0;
        // An epoch begins at a grant and counts what is granted after it.
        if let Some(start) = self.epoch {
            self.epoch_granted += u64::from(more);
            self.caught_up |= self.buffered <= WINDOW_UPDATE_AT as usize;
            if self.epoch_granted >= u64::from(self.window) {
                let quick = pool.min_rtt.is_some_and(|rtt| now.saturating_duration_since(start) <= 2 * rtt);
                if quick && self.caught_up {
                    let free = u32::try_from(GROWTH_POOL - pool.grown).unwrap_or(u32::MAX);
                    let growth = self.window.min(MAX_FLOW_WINDOW - self.window).min(free);
                    self.window += growth;
                    pool.grown += growth as usize;
                    more += growth;
                }
                self.epoch = Some(now);
                self.epoch_granted = 0;
                self.caught_up = false;
            }
        } else {
            self.epoch = Some(now);
        }
        if self.probe.is_none() {
            self.probe = Some((self.allowance, now));
        }
        self.allowance += u64::from(more);
        Some(more)
    }

    fn wake_watcher(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.wake();
        }
    }

    fn wake(&mut self) {
        for w in [self.reader.take(), self.writer.take(), self.watcher.take()].into_iter().flatten() {
            w.wake();
        }
    }
}

/// An attached flow's byte counters, called by the driver as it moves the
/// bytes: a pair of closures (the bytes read from the local socket and
/// sent on the flow, the bytes the flow received and written to the local
/// socket), kept in one allocation.
pub trait Counters: Send + Sync {
    /// Bytes read from the local socket, sent on the flow.
    fn sent(&self, n: u64);
    /// Bytes the flow received, written to the local socket.
    fn received(&self, n: u64);
}

impl<A: Fn(u64) + Send + Sync, B: Fn(u64) + Send + Sync> Counters for (A, B) {
    fn sent(&self, n: u64) {
        (self.0)(n);
    }
    fn received(&self, n: u64) {
        (self.1)(n);
    }
}

/// The growth of a connection's receive windows.
#[derive(Default)]
struct Pool {
    /// What the flows' windows add up to beyond [`INITIAL_WINDOW`] each; at most [`GROWTH_POOL`].
    grown: usize,
    /// The shortest round trip measured on any flow of the connection.
    min_rtt: Option<Duration>,
}

impl State {
    /// What the receive windows of all flows add up to: never more than [`CONN_BUFFER_CAP`].
    fn windows(&self) -> usize {
        self.flows.values().map(|f| f.window as usize).sum()
    }

    /// Removes a flow, returning its window's growth to the pool.
    fn remove_flow(&mut self, id: u32) -> Option<Box<Flow>> {
        let flow = self.flows.remove(&id)?;
        if flow.local.is_some() {
            self.attached.retain(|&a| a != id);
        }
        self.buffered -= flow.buffered;
        self.pool.grown -= (flow.window - INITIAL_WINDOW) as usize;
        Some(flow)
    }

    /// A connection meant to close when idle has carried its flows and is idle.
    fn idle_done(&self) -> bool {
        self.close_when_idle && self.flows.is_empty() && self.ids > 1
    }

    fn wake_driver(&mut self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    /// Resets `id` locally (its handle sees an error) and tells the peer.
    fn reset_flow(&mut self, id: u32) {
        mux::encode_reset(id, &mut self.out);
        if let Some(flow) = self.flows.get_mut(&id) {
            flow.reset = true;
            self.buffered -= flow.buffered;
            flow.buffered = 0;
            flow.inbound = VecDeque::new();
            flow.wake();
        }
    }

    /// Writes what attached flow `id` holds, then `fresh` (bytes just
    /// received for it), to its sink as far as the sink takes them, and
    /// queues the rest of `fresh`; once the peer's FIN arrived and nothing
    /// is left, shuts the sink's write half. A piece smaller than [`BULK`] is
    /// queued and written with the rest of the read, from `attention`. A
    /// sink that pushes back has the driver's waker and the flow waits in
    /// `attention` (fresh bytes are queued meanwhile); a sink that fails
    /// resets the flow.
    fn sink_flow(&mut self, id: u32, mut fresh: &[u8], cx: &mut Context<'_>) {
        let Some(flow) = self.flows.get_mut(&id) else { return };
        if flow.reset || flow.sink_shut {
            return;
        }
        if !fresh.is_empty() && fresh.len() < BULK && !flow.attended {
            // A small piece waits for the rest of this read, so that a peer
            // sending small frames costs one write per read, not one per frame.
            push_chunk(&mut flow.inbound, fresh);
            flow.buffered += fresh.len();
            self.buffered += fresh.len();
            flow.attended = true;
            self.attention.push(id);
            return;
        }
        let Some(sink) = flow.local.clone() else { return };
        let (mut from_queue, mut from_fresh) = (0usize, 0usize);
        let mut blocked = flow.attended;
        let mut failed = None;
        while !blocked {
            let (wrote, queued, avail) = match flow.inbound.front() {
                Some(front) => {
                    let bytes = &front[flow.front_read..];
                    (sink.try_write(bytes), true, bytes.len())
                }
                None if !fresh.is_empty() => (sink.try_write(fresh), false, fresh.len()),
                None => break,
            };
            match wrote {
                Ok(0) => failed = Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) if queued => {
                    from_queue += n;
                    flow.front_read += n;
                    if n == avail {
                        if let Some(chunk) = flow.inbound.pop_front() {
                            spare_chunk(chunk);
                        }
                        flow.front_read = 0;
                    }
                }
                Ok(n) => {
                    from_fresh += n;
                    fresh = &fresh[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => match sink.poll_write_ready(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(e)) => failed = Some(e),
                    Poll::Pending => blocked = true,
                },
                Err(e) => failed = Some(e),
            }
            if failed.is_some() {
                break;
            }
        }
        let moved = from_queue + from_fresh;
        if moved > 0
            && let Some(c) = &flow.counters
        {
            c.received(moved as u64);
        }
        if let Some(e) = failed {
            flow.local_failed = Some(Box::new((e.kind(), format!("writing to the local connection failed: {e}"))));
            self.reset_flow(id);
            return;
        }
        flow.buffered -= from_queue;
        self.buffered -= from_queue;
        // Bounded by the window (u32), so it fits.
        flow.unacked += moved as u32;
        if !fresh.is_empty() {
            push_chunk(&mut flow.inbound, fresh);
            flow.buffered += fresh.len();
            self.buffered += fresh.len();
        }
        let done = flow.inbound.is_empty() && flow.recv_fin;
        if done {
            // Every byte is written: the peer's FIN goes on as ours. A local
            // peer already gone makes this fail, which changes nothing now.
            let _ = socket2::SockRef::from(&*sink).shutdown(std::net::Shutdown::Write);
            flow.sink_shut = true;
        }
        if blocked && !flow.attended {
            flow.attended = true;
            self.attention.push(id);
        }
        if done {
            flow.wake_watcher();
        }
        if let Some(more) = flow.grant(&mut self.pool, Instant::now) {
            mux::encode_window(id, more, &mut self.out);
        }
    }

    /// Reads one DATA frame's worth (within the flow's credit and the out
    /// queue's room) from attached flow `id`'s local socket into the out
    /// queue, or its end as a FIN; a socket with nothing to read has the
    /// driver's waker. A socket that fails resets the flow. Returns whether
    /// it queued anything.
    fn source_flow(&mut self, id: u32, cx: &mut Context<'_>) -> bool {
        let Some(flow) = self.flows.get_mut(&id) else { return false };
        if flow.reset || flow.sent_fin || flow.credit == 0 {
            return false;
        }
        let Some(local) = flow.local.clone() else { return false };
        let read = loop {
            match local.poll_read_ready(cx) {
                Poll::Pending => return false,
                Poll::Ready(Err(e)) => break Err(e),
                Poll::Ready(Ok(())) => {}
            }
            let most = if flow.bulk { MAX_DATA_LEN } else { SMALL_READ };
            let want = most.min(usize::try_from(flow.credit).unwrap_or(usize::MAX));
            let at = self.out.len();
            out_room(&mut self.out, FRAME_HEADER_LEN + want);
            mux::encode_header(mux::DATA, id, 0, &mut self.out);
            let read = local.try_read_buf(&mut (&mut self.out).limit(want));
            match read {
                Ok(n) if n > 0 => {
                    mux::set_body_len(&mut self.out[at..], n);
                    self.out_data += FRAME_HEADER_LEN + n;
                    flow.bulk = n == most;
                }
                _ => self.out.truncate(at),
            }
            // Readiness was stale: it is cleared, and asked for again
            // (which registers the driver's waker) until it is pending.
            if !matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock) {
                break read;
            }
        };
        match read {
            Ok(0) => {
                mux::encode_fin(id, &mut self.out);
                flow.sent_fin = true;
                if flow.sink_shut {
                    flow.wake_watcher();
                }
                true
            }
            Ok(n) => {
                flow.credit -= n as u64;
                if let Some(c) = &flow.counters {
                    c.sent(n as u64);
                }
                true
            }
            Err(e) => {
                flow.local_failed =
                    Some(Box::new((e.kind(), format!("reading from the local connection failed: {e}"))));
                self.reset_flow(id);
                true
            }
        }
    }

    fn close_all(&mut self, why: io::Error) {
        if self.closed.is_none() {
            self.closed = Some(Arc::new(why));
        }
        for flow in self.flows.values_mut() {
            flow.wake();
        }
        if let Some(w) = self.acceptor.take() {
            w.wake();
        }
        if let Some(w) = self.greeter.take() {
            w.wake();
        }
        for w in self.out_waiters.drain(..) {
            w.wake();
        }
    }
}

/// Why a flow could not be opened on a connection.
#[derive(Debug)]
pub enum OpenFlowError {
    /// The connection is gone (with why).
    Closed(Arc<io::Error>),
    /// The connection carries its most flows or ran out of flow ids, or is draining: use another.
    Full,
}

impl MuxConnection {
    /// A connection handle; spawn [`run`] with the stream to drive it.
    pub fn new(side: Side) -> Self {
        let state = State { ids: u32::from(side == Side::Endpoint), ..State::default() };
        Self { shared: Arc::new(Shared { side, state: Mutex::new(state) }) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Flows open on this connection.
    pub fn flows(&self) -> usize {
        self.state().flows.len()
    }

    /// Why the connection is gone, once it is.
    pub fn closed(&self) -> Option<Arc<io::Error>> {
        self.state().closed.clone()
    }

    /// Endpoint side: how many flows were opened here so far (it only grows).
    pub fn opened(&self) -> u32 {
        self.state().ids
    }

    /// Whether `other` is a handle of this same connection.
    pub fn same(&self, other: &MuxConnection) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    /// Whether a new flow may be opened here.
    pub fn can_open(&self) -> bool {
        let st = self.state();
        st.closed.is_none()
            && !st.draining
            && !st.closing
            && !st.idle_done()
            && st.flows.len() < MAX_FLOWS_PER_CONNECTION
            && st.ids < u32::MAX
            && !backlogged(&st, 0)
    }

    /// Endpoint side: opens a flow with `req` (the OPEN frame is queued at once).
    pub fn open(&self, req: &OpenRequest) -> Result<MuxStream, OpenFlowError> {
        debug_assert_eq!(self.shared.side, Side::Endpoint);
        let mut st = self.state();
        if let Some(e) = &st.closed {
            return Err(OpenFlowError::Closed(e.clone()));
        }
        // A connection whose peer does not take its frames takes no new flow: clients that
        // connect and close at once would otherwise queue an OPEN and a RESET each, without bound.
        if st.draining
            || st.closing
            || st.idle_done()
            || st.flows.len() >= MAX_FLOWS_PER_CONNECTION
            || st.ids == u32::MAX
            || backlogged(&st, 0)
        {
            return Err(OpenFlowError::Full);
        }
        let id = st.ids;
        let mut frame = Vec::new();
        mux::encode_open(id, req, &mut frame)
            .map_err(|e| OpenFlowError::Closed(Arc::new(io::Error::new(io::ErrorKind::InvalidInput, e))))?;
        st.ids += 1;
        st.out.extend_from_slice(&frame);
        st.flows.insert(id, Box::new(Flow::new()));
        st.wake_driver();
        Ok(MuxStream { shared: self.shared.clone(), id })
    }

    /// Gateway side: the next flow the peer opened, with its request; `None`
    /// once the connection is gone.
    pub async fn accept(&self) -> Option<(MuxStream, OpenRequest)> {
        std::future::poll_fn(|cx| {
            let mut st = self.state();
            if let Some((id, req)) = st.accepted.pop_front() {
                return Poll::Ready(Some((MuxStream { shared: self.shared.clone(), id }, req)));
            }
            if st.closed.is_some() || st.closing {
                return Poll::Ready(None);
            }
            st.acceptor = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Completes once the peer's version-2 preface arrived (never, if the connection ends first).
    pub async fn greeted(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.state();
            if st.greeted {
                return Poll::Ready(());
            }
            st.greeter = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }

    /// Closes the connection once its last flow is gone; no new flows meanwhile.
    pub fn drain(&self) {
        let mut st = self.state();
        st.draining = true;
        st.wake_driver();
    }

    /// Endpoint side: closes the connection once it has carried a flow and
    /// its last flow is gone; until then it takes new flows.
    pub fn close_when_idle(&self) {
        let mut st = self.state();
        st.close_when_idle = true;
        st.wake_driver();
    }

    /// Whether the connection stays up when idle (not closed, closing, draining, or closing when idle).
    pub fn is_kept(&self) -> bool {
        let st = self.state();
        st.closed.is_none() && !st.draining && !st.closing && !st.close_when_idle
    }

    /// Closes the connection now: queued frames are written, open flows fail.
    pub fn close(&self) {
        let mut st = self.state();
        st.closing = true;
        st.wake_driver();
        if let Some(w) = st.acceptor.take() {
            w.wake();
        }
    }

    /// Marks the connection gone without touching its stream (whose driver
    /// was dropped): open flows fail with `why`.
    pub fn abort(&self, why: &str) {
        self.state().close_all(io::Error::new(io::ErrorKind::ConnectionAborted, why.to_string()));
    }

    /// Gateway side: queues a version-1 answer for a version-1 peer and closes.
    fn refuse_version_1(st: &mut State) {
        let mut out = Vec::new();
        trellis_proto::stream::encode_open_response(
            &OpenResponse::new(
                OpenStatus::BadRequest,
                format!(
                    "this gateway agent speaks stream protocol version {} and the endpoint agent version {}; upgrade the endpoint agent",
                    mux::VERSION,
                    trellis_proto::stream::VERSION
                ),
            ),
            &mut out,
        );
        // The version-1 answer must be the only thing on the wire.
        st.out = out;
        st.out_data = 0;
        st.closing = true;
    }
}

/// Drives `conn` over `io` until the connection ends: writes the preface,
/// then reads and writes frames. Ends when the peer closes or fails, or after
/// [`MuxConnection::close`] (or [`MuxConnection::drain`] and the last flow).
pub async fn run<S>(conn: MuxConnection, io: S)
where
    S: AsyncBufRead + AsyncWrite + Unpin,
{
    let side = conn.shared.side;
    let mut driver = Driver {
        conn,
        io,
        rx: Rx {
            rbuf: vec![0u8; RX_BUF].into_boxed_slice(),
            start: 0,
            end: 0,
            preface_seen: false,
            skip: 0,
            data: None,
            held: false,
            refused: false,
        },
        writing: if side == Side::Endpoint { mux::PREFACE.to_vec() } else { Vec::new() },
        written: 0,
        flush: false,
        shut: false,
        paused: false,
        writing_control: 0,
    };
    let why = std::future::poll_fn(|cx| driver.poll(cx)).await;
    let mut st = driver.conn.state();
    st.close_all(why);
}

struct Driver<S> {
    conn: MuxConnection,
    io: S,
    rx: Rx,
    /// Frames being written (taken from `State::out`), from `written` on.
    writing: Vec<u8>,
    written: usize,
    flush: bool,
    shut: bool,
    /// Reading stopped because control frames over [`OUT_LIMIT`] were queued.
    paused: bool,
    /// Bytes of `writing` that are control frames (counted whole until it is written).
    writing_control: usize,
}

/// The receiving side of a driver. The stream's own buffer (the TLS
/// plaintext) is read in place: DATA bodies go from it to their flows, and
/// only what a frame needs to be parsed whole (its header, a control frame's
/// body) is copied into `rbuf`.
struct Rx {
    rbuf: Box<[u8]>,
    /// `rbuf[start..end]` is received and not yet parsed.
    start: usize,
    end: usize,
    preface_seen: bool,
    /// Body bytes of a skipped frame still to discard.
    skip: u64,
    /// A DATA body being received: flow, bytes left, whether the flow takes them.
    data: Option<(u32, usize, bool)>,
    /// Whole frames are left unparsed until the out queue drains.
    held: bool,
    /// A version-1 peer was answered: what the driver was writing must go.
    refused: bool,
}

/// Whether more than [`OUT_LIMIT`] of control frames waits to be written
/// (`writing_control` of them taken by the driver).
fn backlogged(st: &State, writing_control: usize) -> bool {
    st.out.len() - st.out_data + writing_control > OUT_LIMIT
}

fn closed_by_peer() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer agent closed the tunnel connection")
}

impl<S: AsyncBufRead + AsyncWrite + Unpin> Driver<S> {
    /// `Ready(why)` when the connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        {
            let mut st = self.conn.state();
            if st.driver.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                st.driver = Some(cx.waker().clone());
            }
        }
        self.attend(cx);
        let mut full = self.draw(cx);
        if let Poll::Ready(why) = self.poll_write(cx) {
            return Poll::Ready(why);
        }
        if let Poll::Ready(why) = self.poll_read(cx) {
            return Poll::Ready(why);
        }
        self.attend(cx);
        // Reading may have brought credit, and the write made room.
        full |= self.draw(cx);
        // Reading may have queued frames (window updates, resets, answers).
        if let Poll::Ready(why) = self.poll_write(cx) {
            return Poll::Ready(why);
        }
        // Local sockets were left readable for want of room, which there is now.
        if full && self.conn.state().out.len() < OUT_HIGH {
            cx.waker().wake_by_ref();
        }
        // Reading stopped for the out queue, which is written now: nothing else would wake us.
        if self.paused && !backlogged(&self.conn.state(), self.writing_control) {
            self.paused = false;
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    /// Reads the local sockets of attached flows into the out queue, a frame
    /// per flow in turn, until the queue is full or none has more. Returns
    /// whether it stopped for the queue (sockets may have more).
    fn draw(&mut self, cx: &mut Context<'_>) -> bool {
        let mut guard = self.conn.state();
        let st = &mut *guard;
        if st.attached.is_empty() {
            return false;
        }
        let ids = std::mem::take(&mut st.attached);
        let mut full = false;
        'rounds: loop {
            let mut queued = false;
            for &id in &ids {
                if st.out.len() >= OUT_HIGH {
                    full = true;
                    break 'rounds;
                }
                queued |= st.source_flow(id, cx);
            }
            if !queued {
                break;
            }
        }
        // Flows that ended or were removed meanwhile leave; the next draw starts with the next flow.
        let mut ids = ids;
        ids.retain(|id| st.flows.get(id).is_some_and(|f| f.local.is_some() && !f.sent_fin && !f.reset));
        if ids.len() > 1 {
            ids.rotate_left(1);
        }
        st.attached = ids;
        full
    }

    /// Writes to the local sockets of attached flows that wait for it.
    fn attend(&mut self, cx: &mut Context<'_>) {
        let mut st = self.conn.state();
        if st.attention.is_empty() {
            return;
        }
        for id in std::mem::take(&mut st.attention) {
            if let Some(flow) = st.flows.get_mut(&id) {
                flow.attended = false;
                st.sink_flow(id, &[], cx);
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        loop {
            if self.written < self.writing.len() {
                match Pin::new(&mut self.io).poll_write(cx, &self.writing[self.written..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(io::ErrorKind::WriteZero.into()),
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.flush = true;
                        continue;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => return Poll::Pending,
                }
            }
            self.writing.clear();
            self.written = 0;
            self.writing_control = 0;
            let (closing, done) = {
                let mut st = self.conn.state();
                if !st.out.is_empty() {
                    // The emptied buffer takes the next frames.
                    std::mem::swap(&mut self.writing, &mut st.out);
                    self.writing_control = self.writing.len() - st.out_data;
                    st.out_data = 0;
                    for w in st.out_waiters.drain(..) {
                        w.wake();
                    }
                    continue;
                }
                // Everything queued is written: an idle connection holds no send buffer.
                spare_out(&mut self.writing);
                spare_out(&mut st.out);
                #[cfg(test)]
                {
                    st.writing_capacity = self.writing.capacity();
                }
                (st.closing || (st.draining && st.flows.is_empty()) || st.idle_done(), st.closed.is_some())
            };
            if done {
                return Poll::Ready(io::Error::other("closed"));
            }
            if self.flush {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if closing {
                if !self.shut {
                    match Pin::new(&mut self.io).poll_shutdown(cx) {
                        Poll::Ready(_) => self.shut = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                return Poll::Ready(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the tunnel connection was closed",
                ));
            }
            return Poll::Pending;
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        for _ in 0..READS_PER_POLL {
            {
                let st = self.conn.state();
                // Readers wake the driver when they take bytes; a closing connection reads no more.
                if st.buffered > CONN_BUFFER_CAP || st.closing {
                    return Poll::Pending;
                }
                // A peer that does not read gets no more answers queued: stop reading it.
                if backlogged(&st, self.writing_control) {
                    self.paused = true;
                    return Poll::Pending;
                }
            }
            let taken = if self.rx.held {
                // Frames received before the out queue filled up come first.
                self.rx.held = false;
                self.rx.parse(&self.conn, self.writing_control, cx).map(|()| 0)
            } else {
                let buf = match Pin::new(&mut self.io).poll_fill_buf(cx) {
                    Poll::Ready(Ok([])) => return Poll::Ready(closed_by_peer()),
                    Poll::Ready(Ok(buf)) => buf,
                    Poll::Ready(Err(e)) => return Poll::Ready(e),
                    Poll::Pending => return Poll::Pending,
                };
                self.rx.take(&self.conn, self.writing_control, buf, cx)
            };
            if self.rx.refused {
                // The version-1 answer must be the only thing on the wire.
                self.rx.refused = false;
                self.writing.clear();
                self.written = 0;
                self.writing_control = 0;
            }
            match taken {
                Ok(n) => Pin::new(&mut self.io).consume(n),
                Err(why) => return Poll::Ready(why),
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl Rx {
    /// Takes what it can of `buf` (the stream's next received bytes): DATA
    /// bodies and skipped bodies straight from it, the rest copied into
    /// `rbuf` as far as the next frame needs and parsed there. Returns how
    /// much of `buf` it took; while frames are held it takes no more.
    fn take(
        &mut self,
        conn: &MuxConnection,
        writing_control: usize,
        buf: &[u8],
        cx: &mut Context<'_>,
    ) -> Result<usize, io::Error> {
        let mut used = 0;
        loop {
            self.parse(conn, writing_control, cx)?;
            if self.held || self.refused || used == buf.len() {
                return Ok(used);
            }
            let rest = &buf[used..];
            // `parse` leaves a DATA or skipped body only once `rbuf` is empty.
            if let Some((id, left, take)) = self.data {
                let n = rest.len().min(left);
                deliver(&mut conn.state(), id, take, &rest[..n], cx);
                used += n;
                self.data = (left > n).then_some((id, left - n, take));
                continue;
            }
            if self.skip > 0 {
                let n = rest.len().min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                used += n;
                self.skip -= n as u64;
                continue;
            }
            let want = self.wanted();
            if self.rbuf.len() - self.end < want {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let n = want.min(rest.len());
            if n == 0 {
                // Cannot happen: a frame that fits in `rbuf` was not parsed.
                return Err(io::Error::new(io::ErrorKind::InvalidData, "tunnel frame could not be parsed"));
            }
            self.rbuf[self.end..self.end + n].copy_from_slice(&rest[..n]);
            self.end += n;
            used += n;
        }
    }

    /// How many more bytes `rbuf` needs for `parse` to get on: the rest of
    /// the frame header, or of a control frame; before the preface, all it holds.
    fn wanted(&self) -> usize {
        let have = self.end - self.start;
        if !self.preface_seen {
            return self.rbuf.len() - have;
        }
        match mux::decode_header(&self.rbuf[self.start..self.end]) {
            None => FRAME_HEADER_LEN - have,
            // `parse` took DATA and oversized headers: this is a control frame.
            Some(h) => (FRAME_HEADER_LEN + h.len as usize).saturating_sub(have),
        }
    }

    /// Handles every whole frame (and every DATA byte) in `rbuf[start..end]`.
    fn parse(&mut self, conn: &MuxConnection, writing_control: usize, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if self.start == self.end {
            return Ok(());
        }
        let side = conn.shared.side;
        let mut guard = conn.state();
        let st: &mut State = &mut guard;
        if !self.preface_seen {
            match mux::check_preface(&self.rbuf[self.start..self.end]) {
                Ok(Preface::Incomplete) => return Ok(()),
                Ok(Preface::Version2) => {
                    self.start += mux::PREFACE.len();
                    self.preface_seen = true;
                    st.greeted = true;
                    if let Some(w) = st.greeter.take() {
                        w.wake();
                    }
                    if side == Side::Gateway {
                        // The gateway answers in kind only once it knows the peer's version.
                        st.out.splice(0..0, mux::PREFACE);
                    }
                }
                Ok(Preface::Version1) if side == Side::Gateway => {
                    MuxConnection::refuse_version_1(st);
                    self.refused = true;
                    self.start = self.end;
                    return Ok(());
                }
                Ok(Preface::Version1) => {
                    let said = match trellis_proto::stream::decode_open_response(&self.rbuf[self.start..self.end]) {
                        Ok(None) => return Ok(()),
                        Ok(Some((resp, _))) => format!(": it answered {}: {}", resp.status, resp.message),
                        Err(_) => String::new(),
                    };
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "the gateway agent speaks stream protocol version {}, this agent version {}; upgrade the gateway agent{said}",
                            trellis_proto::stream::VERSION,
                            mux::VERSION
                        ),
                    ));
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        loop {
            let avail = self.end - self.start;
            if self.skip > 0 {
                let n = avail.min(usize::try_from(self.skip).unwrap_or(usize::MAX));
                self.start += n;
                self.skip -= n as u64;
                if self.skip > 0 {
                    return Ok(());
                }
                continue;
            }
            if let Some((id, left, take)) = self.data {
                let n = avail.min(left);
                if n == 0 {
                    return Ok(());
                }
                deliver(st, id, take, &self.rbuf[self.start..self.start + n], cx);
                self.start += n;
                self.data = if left == n { None } else { Some((id, left - n, take)) };
                continue;
            }
            let Some(h) = mux::decode_header(&self.rbuf[self.start..self.end]) else { return Ok(()) };
            if backlogged(st, writing_control) {
                // The rest waits until the peer has read some of what is queued for it.
                self.held = true;
                return Ok(());
            }
            if h.oversized() {
                tracing::debug!(
                    flow = h.flow,
                    kind = h.kind,
                    len = h.len,
                    "oversized tunnel frame; resetting its flow"
                );
                self.start += FRAME_HEADER_LEN;
                self.skip = u64::from(h.len);
                st.reset_flow(h.flow);
                continue;
            }
            let len = h.len as usize;
            if h.kind == mux::DATA {
                self.start += FRAME_HEADER_LEN;
                let take = match st.flows.get_mut(&h.flow) {
                    Some(flow) if !flow.reset => {
                        if len == 0 {
                            tracing::debug!(flow = h.flow, "empty DATA frame; resetting the flow");
                            st.reset_flow(h.flow);
                            false
                        } else if flow.recv_fin || len as u64 > flow.allowance {
                            tracing::debug!(
                                flow = h.flow,
                                "tunnel peer sent past its window or after FIN; resetting the flow"
                            );
                            st.reset_flow(h.flow);
                            false
                        } else {
                            flow.received(len, &mut st.pool, Instant::now);
                            true
                        }
                    }
                    // A flow closed here: the peer's bytes were in flight.
                    _ => false,
                };
                self.data = (len > 0).then_some((h.flow, len, take));
                continue;
            }
            if avail < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let body = &self.rbuf[self.start + FRAME_HEADER_LEN..self.start + FRAME_HEADER_LEN + len];
            let parsed = mux::parse_control(h.kind, body);
            self.start += FRAME_HEADER_LEN + len;
            match parsed {
                Ok(control) => Self::control(st, side, h.flow, control),
                Err(e) => {
                    tracing::debug!(flow = h.flow, error = %e, "malformed tunnel frame; resetting its flow");
                    if h.kind == mux::OPEN && side == Side::Gateway && !st.flows.contains_key(&h.flow) {
                        let resp = OpenResponse::new(OpenStatus::BadRequest, e.to_string());
                        mux::encode_open_response(h.flow, &resp, &mut st.out);
                    }
                    st.reset_flow(h.flow);
                }
            }
        }
    }

    fn control(st: &mut State, side: Side, id: u32, control: Control) {
        match control {
            Control::Open(req) if side == Side::Gateway => {
                if id <= st.ids || st.closing {
                    tracing::debug!(flow = id, "tunnel peer reused a flow id; resetting it");
                    st.reset_flow(id);
                    return;
                }
                st.ids = id;
                if st.flows.len() >= MAX_FLOWS_PER_CONNECTION {
                    let resp = OpenResponse::new(
                        OpenStatus::Denied,
                        format!("a tunnel connection carries at most {MAX_FLOWS_PER_CONNECTION} flows"),
                    );
                    mux::encode_open_response(id, &resp, &mut st.out);
                    mux::encode_reset(id, &mut st.out);
                    return;
                }
                st.flows.insert(id, Box::new(Flow::new()));
                st.accepted.push_back((id, req));
                if let Some(w) = st.acceptor.take() {
                    w.wake();
                }
            }
            Control::Open(_) => {
                tracing::warn!(flow = id, "a gateway agent tried to open a flow toward the consumer; refused");
                mux::encode_reset(id, &mut st.out);
            }
            Control::OpenResponse(resp) if side == Side::Endpoint => {
                if let Some(flow) = st.flows.get_mut(&id)
                    && flow.response.is_none()
                {
                    flow.response = Some(resp);
                    flow.wake();
                }
            }
            Control::OpenResponse(_) => st.reset_flow(id),
            Control::Fin => {
                if let Some(flow) = st.flows.get_mut(&id) {
                    flow.recv_fin = true;
                    flow.wake();
                    if flow.local.is_some() && !flow.attended {
                        // The driver passes it on once the flow's bytes are written.
                        flow.attended = true;
                        st.attention.push(id);
                    }
                }
            }
            Control::Reset => {
                if let Some(flow) = st.flows.get_mut(&id) {
                    flow.reset = true;
                    st.buffered -= flow.buffered;
                    flow.buffered = 0;
                    flow.inbound = VecDeque::new();
                    flow.wake();
                }
            }
            Control::Window(more) => {
                if let Some(flow) = st.flows.get_mut(&id) {
                    flow.credit = (flow.credit + u64::from(more)).min(MAX_WINDOW);
                    if let Some(w) = flow.writer.take() {
                        w.wake();
                    }
                }
            }
        }
    }
}

/// Hands `bytes` of a DATA body to flow `id`, when it `take`s them (a flow
/// reset or closed here does not).
fn deliver(st: &mut State, id: u32, take: bool, bytes: &[u8], cx: &mut Context<'_>) {
    if take
        && let Some(flow) = st.flows.get_mut(&id)
        && !flow.reset
    {
        if flow.local.is_some() {
            st.sink_flow(id, bytes, cx);
            return;
        }
        push_chunk(&mut flow.inbound, bytes);
        flow.buffered += bytes.len();
        if let Some(w) = flow.reader.take() {
            w.wake();
        }
        st.buffered += bytes.len();
    }
}

/// Appends received bytes to a flow's queue: into its last chunk up to
/// [`CHUNK`], the rest as a new chunk, so every chunk but the last is full.
/// A flow's first chunk keeps its capacity within twice its length (or 512
/// bytes) while it takes small pieces, so memory follows the payload however
/// small the frames (a chunk per one-byte frame would cost ~59 bytes per
/// byte). A chunk that takes a piece of [`BULK`] or more, or that follows a
/// full one, is a whole chunk at once (a spare one, see [`whole_chunk`]): a
/// stream of TLS records is never copied again to grow a chunk, and a queue
/// that ebbs and fills reuses the same memory.
fn push_chunk(inbound: &mut VecDeque<Vec<u8>>, mut bytes: &[u8]) {
    let queued = inbound.len();
    if let Some(last) = inbound.back_mut()
        && last.len() < CHUNK
    {
        let n = bytes.len().min(CHUNK - last.len());
        if last.capacity() - last.len() < n {
            if n >= BULK || queued > 1 {
                let mut whole = whole_chunk();
                whole.extend_from_slice(last);
                *last = whole;
            } else {
                last.reserve_exact((2 * last.len()).max(last.len() + n).min(CHUNK) - last.len());
            }
        }
        last.extend_from_slice(&bytes[..n]);
        bytes = &bytes[n..];
    }
    for piece in bytes.chunks(CHUNK) {
        let mut chunk = if piece.len() >= BULK || !inbound.is_empty() {
            whole_chunk()
        } else {
            Vec::with_capacity(piece.len().max(512))
        };
        chunk.extend_from_slice(piece);
        inbound.push_back(chunk);
    }
}

thread_local! {
    /// Out buffers of [`OUT_CAP`] given back by connections of this thread that went idle.
    static SPARE_OUT: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
thread_local! {
    /// Out buffers of [`OUT_CAP`] this thread allocated (for tests).
    static OUT_ALLOCATED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Makes room for `more` bytes in an out queue. A queue that grows past
/// [`OUT_WHOLE_AT`] (bulk: DATA frames of up to 64 KiB) gets a whole buffer
/// of [`OUT_CAP`] at once (a spare one of this thread if there is), so a
/// busy connection neither grows its queue by doubling (each step copying
/// what it holds) nor allocates one per batch: it keeps its two buffers
/// (the queue and the batch being written) until it goes idle and gives
/// them back ([`spare_out`]). Small traffic never takes one.
fn out_room(out: &mut Vec<u8>, more: usize) {
    if out.capacity() - out.len() >= more {
        return;
    }
    if out.len() + more <= OUT_WHOLE_AT || out.capacity() >= OUT_CAP || out.len() + more > OUT_CAP {
        out.reserve(more);
        return;
    }
    let spare = SPARE_OUT.try_with(|spares| spares.borrow_mut().pop()).ok().flatten();
    let mut whole = spare.unwrap_or_else(|| {
        #[cfg(test)]
        OUT_ALLOCATED.with(|n| n.set(n.get() + 1));
        Vec::with_capacity(OUT_CAP)
    });
    whole.extend_from_slice(out);
    *out = whole;
}

/// Takes the buffer of an emptied out queue unless it is small: a whole one
/// becomes a spare of this thread (if there is room), so an idle connection
/// holds no send buffer.
fn spare_out(out: &mut Vec<u8>) {
    debug_assert!(out.is_empty());
    if out.capacity() <= OUT_KEEP {
        return;
    }
    let buf = std::mem::take(out);
    if buf.capacity() == OUT_CAP {
        // A thread that is exiting keeps nothing: the buffer is freed.
        let _ = SPARE_OUT.try_with(|spares| {
            let mut spares = spares.borrow_mut();
            if spares.len() < MAX_SPARE_OUT {
                spares.push(buf);
            }
        });
    }
}

/// Whole chunks that were emptied, kept for the next bytes a flow queues,
/// by all connections of the process together: a flow whose local socket
/// pushes back queues every byte it receives, and a chunk allocated for each
/// and freed once written made the allocator hand the memory back to the
/// system and fault it in again, a quarter of a busy gateway's time. At most
/// [`MAX_SPARE_CHUNKS`] are kept, whatever the number of connections.
static SPARE_CHUNKS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// What the process keeps of emptied chunks: 4 MiB, the queues of a few
/// bulk flows as they ebb and fill.
const MAX_SPARE_CHUNKS: usize = 64;

/// An empty chunk of capacity [`CHUNK`]: a spare one if there is.
fn whole_chunk() -> Vec<u8> {
    let spare = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner()).pop();
    spare.unwrap_or_else(|| Vec::with_capacity(CHUNK))
}

/// Keeps an emptied chunk as a spare, if it is whole and there is room.
fn spare_chunk(mut chunk: Vec<u8>) {
    if chunk.capacity() == CHUNK {
        let mut spares = SPARE_CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
        if spares.len() < MAX_SPARE_CHUNKS {
            chunk.clear();
            spares.push(chunk);
        }
    }
}

/// One flow of a [`MuxConnection`]. Dropping it before both directions
/// finished resets the flow.
pub struct MuxStream {
    shared: Arc<Shared>,
    id: u32,
}

fn reset_error(side: Side) -> io::Error {
    let who = match side {
        Side::Endpoint => "the gateway agent",
        Side::Gateway => "the endpoint agent",
    };
    io::Error::new(io::ErrorKind::ConnectionReset, format!("{who} reset this flow"))
}

fn conn_error(e: &io::Error) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, format!("the tunnel connection failed: {e}"))
}

impl MuxStream {
    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The flow id (for logs and tests).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Endpoint side: waits for the gateway's answer to the open request.
    pub fn response(&mut self) -> impl Future<Output = io::Result<OpenResponse>> + '_ {
        std::future::poll_fn(move |cx| {
            let mut st = self.state();
            let closed = st.closed.clone();
            let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(Side::Endpoint))) };
            if let Some(resp) = flow.response.take() {
                return Poll::Ready(Ok(resp));
            }
            if flow.reset {
                return Poll::Ready(Err(reset_error(Side::Endpoint)));
            }
            if let Some(e) = closed {
                return Poll::Ready(Err(io::Error::new(e.kind(), e.to_string())));
            }
            flow.reader = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    /// Why the flow's connection failed, once it did.
    pub fn connection_error(&self) -> Option<Arc<io::Error>> {
        self.state().closed.clone()
    }

    /// Gateway side: answers the open request.
    pub fn respond(&self, resp: &OpenResponse) {
        let mut st = self.state();
        mux::encode_open_response(self.id, resp, &mut st.out);
        st.wake_driver();
    }

    /// Hands the flow's data to its connection's driver, which moves it
    /// between the tunnel and `local` from then on, with no task in between
    /// and no copy on the receiving side: it reads `local` into DATA frames
    /// (within the flow's credit) and passes its end on as a FIN, and writes
    /// what the flow receives to `local` straight from the stream's buffer,
    /// passing the peer's FIN on as a shutdown of `local`'s write half. A
    /// local socket that fails resets the flow. The flow is not read or
    /// written any more; [`MuxStream::poll_attached`] follows it.
    pub fn attach(&self, local: Arc<TcpStream>, counters: Box<dyn Counters>) {
        let mut st = self.state();
        let Some(flow) = st.flows.get_mut(&self.id) else { return };
        flow.local = Some(local);
        flow.counters = Some(counters);
        if (!flow.inbound.is_empty() || flow.recv_fin) && !flow.attended {
            flow.attended = true;
            st.attention.push(self.id);
        }
        st.attached.push(self.id);
        st.wake_driver();
    }

    /// An attached flow: ready once both directions finished or the flow failed.
    pub fn poll_attached(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let side = self.shared.side;
        let mut st = self.state();
        let closed = st.closed.clone();
        let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(side))) };
        if let Some(failed) = &flow.local_failed {
            Poll::Ready(Err(io::Error::new(failed.0, failed.1.clone())))
        } else if flow.sink_shut && flow.sent_fin {
            Poll::Ready(Ok(()))
        } else if flow.reset {
            Poll::Ready(Err(reset_error(side)))
        } else if let Some(e) = closed {
            Poll::Ready(Err(conn_error(&e)))
        } else {
            flow.watcher = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Unread bytes this flow holds (for tests).
    pub fn buffered(&self) -> usize {
        self.state().flows.get(&self.id).map_or(0, |f| f.buffered)
    }
}

impl MuxStream {
    /// The flow, once it has bytes to read: `Ready(None)` at its end.
    fn readable<'a>(&self, st: &'a mut State, cx: &Context<'_>) -> Poll<io::Result<Option<&'a mut Flow>>> {
        let side = self.shared.side;
        let closed = st.closed.as_ref().map(|e| conn_error(e));
        let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(side))) };
        if flow.reset {
            return Poll::Ready(Err(reset_error(side)));
        }
        if !flow.inbound.is_empty() {
            return Poll::Ready(Ok(Some(flow)));
        }
        if flow.recv_fin {
            return Poll::Ready(Ok(None));
        }
        if let Some(e) = closed {
            return Poll::Ready(Err(e));
        }
        flow.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The reader took `taken` bytes: grants them back to the peer when a
    /// WINDOW is due, and wakes a driver that stopped reading for a full connection.
    fn took(&self, st: &mut State, taken: usize) {
        let was_full = st.buffered > CONN_BUFFER_CAP;
        st.buffered -= taken;
        let Some(flow) = st.flows.get_mut(&self.id) else { return };
        if flow.inbound.is_empty() {
            flow.inbound = VecDeque::new();
        }
        flow.buffered -= taken;
        // Bounded by the window (u32), so it fits.
        flow.unacked += taken as u32;
        if let Some(more) = flow.grant(&mut st.pool, Instant::now) {
            mux::encode_window(self.id, more, &mut st.out);
            debug_assert!(st.windows() <= CONN_BUFFER_CAP);
            st.wake_driver();
        } else if was_full {
            st.wake_driver();
        }
    }

    /// Takes the oldest chunk of received bytes whole, without copying it
    /// (see [`crate::splice::Source`]); an empty one at the end of the flow.
    pub fn poll_take(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Vec<u8>>> {
        let mut guard = self.state();
        let st = &mut *guard;
        let flow = match self.readable(st, cx) {
            Poll::Ready(Ok(Some(flow))) => flow,
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(Vec::new())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let Some(mut chunk) = flow.inbound.pop_front() else { return Poll::Ready(Ok(Vec::new())) };
        if flow.front_read > 0 {
            chunk.drain(..flow.front_read);
            flow.front_read = 0;
        }
        self.took(st, chunk.len());
        Poll::Ready(Ok(chunk))
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let mut guard = self.state();
        let st = &mut *guard;
        let flow = match self.readable(st, cx) {
            Poll::Ready(Ok(Some(flow))) => flow,
            Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = flow.inbound.front() else { break };
            let n = buf.remaining().min(front.len() - flow.front_read);
            buf.put_slice(&front[flow.front_read..flow.front_read + n]);
            flow.front_read += n;
            taken += n;
            if flow.front_read == front.len() {
                if let Some(chunk) = flow.inbound.pop_front() {
                    spare_chunk(chunk);
                }
                flow.front_read = 0;
            }
        }
        self.took(st, taken);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for MuxStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let side = self.shared.side;
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(e) = &st.closed {
            return Poll::Ready(Err(conn_error(e)));
        }
        let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(side))) };
        if flow.reset {
            return Poll::Ready(Err(reset_error(side)));
        }
        if flow.sent_fin {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if flow.credit == 0 {
            flow.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if st.out.len() >= OUT_HIGH {
            st.out_waiters.push(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(MAX_DATA_LEN).min(usize::try_from(flow.credit).unwrap_or(usize::MAX));
        flow.credit -= n as u64;
        out_room(&mut st.out, FRAME_HEADER_LEN + n);
        mux::encode_header(mux::DATA, self.id, n, &mut st.out);
        st.out.extend_from_slice(&buf[..n]);
        st.out_data += FRAME_HEADER_LEN + n;
        st.wake_driver();
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The driver writes and flushes as soon as frames are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let side = self.shared.side;
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(side))) };
        if !flow.sent_fin && !flow.reset {
            flow.sent_fin = true;
            mux::encode_fin(self.id, &mut st.out);
            st.wake_driver();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for MuxStream {
    fn drop(&mut self) {
        let mut st = self.state();
        let Some(flow) = st.remove_flow(self.id) else { return };
        let finished = flow.sent_fin && flow.recv_fin;
        if !finished && !flow.reset && st.closed.is_none() {
            mux::encode_reset(self.id, &mut st.out);
        }
        st.wake_driver();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn request(port: u16) -> OpenRequest {
        OpenRequest {
            vpc_endpoint_id: "vpce-1".into(),
            resource_configuration_id: "rcfg-1".into(),
            port,
            client_addr: "127.0.0.1:9".parse().unwrap(),
        }
    }

    /// An endpoint and a gateway connection over an in-memory stream; the
    /// gateway answers every flow Ok and echoes it (half-closing after the peer did).
    fn pair() -> (MuxConnection, MuxConnection) {
        pair_over(256 * 1024)
    }

    /// [`pair`] over a pipe that holds `pipe` bytes each way. Port 1: the
    /// gateway floods the flow and never reads; port 2: it sends [`BOTH_WAYS`]
    /// bytes while it reads the flow to its end; else it echoes.
    fn pair_over(pipe: usize) -> (MuxConnection, MuxConnection) {
        let (a, b) = tokio::io::duplex(pipe);
        let (ep, gw) = (MuxConnection::new(Side::Endpoint), MuxConnection::new(Side::Gateway));
        tokio::spawn(run(ep.clone(), tokio::io::BufReader::new(a)));
        tokio::spawn(run(gw.clone(), tokio::io::BufReader::new(b)));
        let acceptor = gw.clone();
        tokio::spawn(async move {
            while let Some((mut stream, req)) = acceptor.accept().await {
                stream.respond(&OpenResponse::new(OpenStatus::Ok, ""));
                tokio::spawn(async move {
                    if req.port == 1 {
                        // A flow the gateway floods and the endpoint never reads.
                        let chunk = vec![7u8; 64 * 1024];
                        while stream.write_all(&chunk).await.is_ok() {}
                        return;
                    }
                    if req.port == 2 {
                        let _ = send_and_receive(stream).await;
                        return;
                    }
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    let _ = stream.shutdown().await;
                    // Keep the flow until the peer is done with it.
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        (ep, gw)
    }

    /// What each side of a port-2 flow sends.
    const BOTH_WAYS: usize = 2 * 1024 * 1024;

    /// Sends [`BOTH_WAYS`] bytes and half-closes while reading the flow to its end; returns the bytes read.
    async fn send_and_receive(mut s: MuxStream) -> io::Result<usize> {
        let (mut r, mut w) = tokio::io::split(&mut s);
        let writer = async {
            let chunk = vec![3u8; 64 * 1024];
            for _ in 0..BOTH_WAYS / chunk.len() {
                w.write_all(&chunk).await?;
            }
            w.shutdown().await
        };
        let mut sink = vec![0u8; 64 * 1024];
        let reader = async {
            let mut n = 0;
            loop {
                match r.read(&mut sink).await? {
                    0 => return Ok(n),
                    k => n += k,
                }
            }
        };
        let (written, read) = tokio::join!(writer, reader);
        written?;
        read
    }

    async fn open_ok(ep: &MuxConnection, port: u16) -> MuxStream {
        let mut s = ep.open(&request(port)).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), s.response()).await.unwrap().unwrap();
        assert_eq!(resp.status, OpenStatus::Ok);
        s
    }

    /// Writes `data`, half-closes, and reads the echo to its end.
    async fn echo<S: AsyncRead + AsyncWrite>(s: S, data: Vec<u8>) -> Vec<u8> {
        let mut s = std::pin::pin!(s);
        let (mut r, mut w) = tokio::io::split(&mut s);
        let writer = async {
            w.write_all(&data).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let reader = r.read_to_end(&mut got);
        let ((), read) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(writer, reader) }).await.unwrap();
        read.unwrap();
        got
    }

    #[tokio::test]
    async fn one_connection_carries_flows_in_sequence_and_at_once_each_with_half_close() {
        let (ep, gw) = pair();
        for i in 0..3u8 {
            let s = open_ok(&ep, 80).await;
            let data = vec![i; 300 * 1024];
            assert_eq!(echo(s, data.clone()).await, data);
        }
        let mut flows = Vec::new();
        for i in 0..50u8 {
            let s = open_ok(&ep, 80).await;
            flows.push(tokio::spawn(echo(s, vec![i; 20_000 + usize::from(i) * 997])));
        }
        for (i, f) in flows.into_iter().enumerate() {
            let got = f.await.unwrap();
            assert_eq!(got.len(), 20_000 + i * 997);
            assert!(got.iter().all(|&b| usize::from(b) == i));
        }
        // Flows that ended are gone from both sides.
        tokio::time::timeout(Duration::from_secs(5), async {
            while ep.flows() + gw.flows() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }

    /// A connected pair of loopback sockets: the application's end and the end to attach.
    async fn local_pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (local, _) = listener.accept().await.unwrap();
        (app, local)
    }

    /// Attaches `local` to `flow` in a task; returns the splice's end and the bytes counted each way.
    fn spawn_attached(
        local: TcpStream,
        flow: MuxStream,
    ) -> tokio::task::JoinHandle<(crate::splice::SpliceEnd, u64, u64)> {
        use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
        let (up, down) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (u, d) = (up.clone(), down.clone());
        tokio::spawn(async move {
            let end = crate::splice::splice_attached(
                local,
                flow,
                move |n| {
                    u.fetch_add(n, Relaxed);
                },
                move |n| {
                    d.fetch_add(n, Relaxed);
                },
                std::future::pending(),
            )
            .await;
            (end, up.load(Relaxed), down.load(Relaxed))
        })
    }

    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(10), async {
            while !what() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn an_attached_flow_moves_bytes_both_ways_passes_half_close_on_and_counts_them() {
        let (ep, gw) = pair();
        let data: Vec<u8> = (0..3 * 1024 * 1024).map(|i: usize| (i % 251) as u8).collect();
        for _ in 0..2 {
            let (app, local) = local_pair().await;
            let spliced = spawn_attached(local, open_ok(&ep, 80).await);
            assert!(echo(app, data.clone()).await == data, "the echo arrives whole and in order");
            let (end, up, down) = spliced.await.unwrap();
            assert!(matches!(end, crate::splice::SpliceEnd::Closed), "{end:?}");
            assert_eq!((up, down), (data.len() as u64, data.len() as u64));
        }
        until(|| ep.flows() + gw.flows() == 0).await;
    }

    #[tokio::test]
    async fn an_attached_flow_whose_application_does_not_read_holds_at_most_its_window() {
        let (ep, _gw) = pair();
        let (app, local) = local_pair().await;
        let _spliced = spawn_attached(local, open_ok(&ep, 1).await);
        // The kernel's socket buffers fill first (the window may grow while
        // they take bytes at once), then the flow's window.
        until(|| ep.state().buffered > 0).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (buffered, window) = {
            let st = ep.state();
            (st.buffered, st.flows.values().map(|f| f.window as usize).sum::<usize>())
        };
        assert!(window <= MAX_FLOW_WINDOW as usize);
        assert!(buffered <= window, "a flow never holds more than its window: {buffered} > {window}");
        assert!(buffered + WINDOW_UPDATE_AT as usize >= window, "the peer filled the window: {buffered} of {window}");
        let data = vec![9u8; 2 * 1024 * 1024];
        assert_eq!(echo(open_ok(&ep, 80).await, data.clone()).await, data, "another flow moves meanwhile");
        drop(app);
    }

    #[tokio::test]
    async fn an_attached_flow_whose_application_resets_is_reset_on_both_sides() {
        let (ep, gw) = pair();
        let (mut app, local) = local_pair().await;
        let spliced = spawn_attached(local, open_ok(&ep, 1).await);
        let mut some = [0u8; 1000];
        app.read_exact(&mut some).await.unwrap();
        socket2::SockRef::from(&app).set_linger(Some(Duration::ZERO)).unwrap();
        drop(app);
        let (end, _, down) = tokio::time::timeout(Duration::from_secs(10), spliced).await.unwrap().unwrap();
        match end {
            crate::splice::SpliceEnd::Error(e) => assert!(e.to_string().contains("local connection"), "{e}"),
            other => panic!("expected an error, got {other:?}"),
        }
        assert!(down > 0, "bytes written before the reset are counted");
        until(|| ep.flows() + gw.flows() == 0).await;
        let data = vec![3u8; 100_000];
        assert_eq!(echo(open_ok(&ep, 80).await, data.clone()).await, data, "the connection carries on");
    }

    #[tokio::test]
    async fn a_slow_reader_stalls_only_its_own_flow_and_holds_at_most_its_window() {
        let (ep, _gw) = pair();
        let flooded = open_ok(&ep, 1).await;
        // The flooded flow fills its window; nothing reads it.
        tokio::time::timeout(Duration::from_secs(5), async {
            while flooded.buffered() < INITIAL_WINDOW as usize {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let data = vec![9u8; 2 * 1024 * 1024];
        let s = open_ok(&ep, 80).await;
        assert_eq!(echo(s, data.clone()).await, data, "another flow moves while one is stalled");
        assert_eq!(flooded.buffered(), INITIAL_WINDOW as usize, "a flow never holds more than its window");
    }

    #[tokio::test]
    async fn slow_readers_on_every_other_flow_never_stop_a_new_open_or_its_bytes() {
        let (ep, _gw) = pair();
        // Every flow of the connection but one is flooded and never read.
        let mut flooded = Vec::new();
        for _ in 0..MAX_FLOWS_PER_CONNECTION - 1 {
            flooded.push(open_ok(&ep, 1).await);
        }
        let filled = tokio::time::timeout(Duration::from_secs(20), async {
            while flooded.iter().any(|f| f.buffered() < INITIAL_WINDOW as usize) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
        assert!(filled.is_ok(), "the connection stopped reading before every flow's window was full");
        // The last flow the connection may carry is answered and moves.
        let s = open_ok(&ep, 80).await;
        let data = vec![5u8; 1024 * 1024];
        assert_eq!(echo(s, data.clone()).await, data, "a flow moves while every other one is stalled");
        assert!(flooded.iter().all(|f| f.buffered() == INITIAL_WINDOW as usize));
    }

    #[tokio::test]
    async fn flows_sending_bulk_both_ways_at_once_never_stop_both_readers() {
        // A small pipe: both drivers often find it full, with their writers' DATA queued.
        let (ep, _gw) = pair_over(16 * 1024);
        let mut flows = Vec::new();
        for _ in 0..8 {
            let s = open_ok(&ep, 2).await;
            flows.push(tokio::spawn(send_and_receive(s)));
        }
        let done = tokio::time::timeout(Duration::from_secs(60), async {
            for f in flows {
                assert_eq!(f.await.unwrap().unwrap(), BOTH_WAYS);
            }
        })
        .await;
        assert!(done.is_ok(), "the connection stalled with bulk data queued both ways");
    }

    /// One round trip of a flow in [`window_rounds`]: the peer sends all it
    /// may in DATA frames of 64 KiB, then the reader takes `read` of what
    /// waits (everything when `None`), in reads of 64 KiB; returns the grants.
    fn round(flow: &mut Flow, pool: &mut Pool, now: Instant, read: Option<usize>) -> u64 {
        let mut left = flow.allowance;
        while left > 0 {
            let n = left.min(MAX_DATA_LEN as u64) as usize;
            flow.received(n, pool, || now);
            flow.buffered += n;
            left -= n as u64;
        }
        let mut to_read = read.unwrap_or(flow.buffered).min(flow.buffered);
        let mut granted = 0;
        while to_read > 0 {
            let n = to_read.min(MAX_DATA_LEN);
            flow.buffered -= n;
            flow.unacked += n as u32;
            to_read -= n;
            granted += u64::from(flow.grant(pool, || now).unwrap_or(0));
        }
        granted
    }

    /// Runs `rounds` round trips of `rtt` from `t0` on `flow` (see [`round`]); returns the windows after each.
    fn window_rounds(
        flow: &mut Flow,
        pool: &mut Pool,
        t0: Instant,
        rtt: Duration,
        rounds: u32,
        read: Option<usize>,
    ) -> Vec<u32> {
        (0..rounds)
            .map(|k| {
                round(flow, pool, t0 + rtt * k, read);
                flow.window
            })
            .collect()
    }

    #[test]
    fn a_fast_reader_s_window_doubles_each_round_trip_to_its_maximum() {
        let (mut flow, mut pool) = (Flow::new(), Pool::default());
        let windows = window_rounds(&mut flow, &mut pool, Instant::now(), Duration::from_millis(10), 10, None);
        // The first round trip measures the round trip; from then on the window doubles.
        assert_eq!(windows[0], INITIAL_WINDOW, "{windows:?}");
        assert_eq!(windows[1], 2 * INITIAL_WINDOW, "{windows:?}");
        assert_eq!(windows[6], MAX_FLOW_WINDOW, "{windows:?}");
        assert_eq!(*windows.last().unwrap(), MAX_FLOW_WINDOW);
        assert_eq!(pool.grown, (MAX_FLOW_WINDOW - INITIAL_WINDOW) as usize);
        assert_eq!(pool.min_rtt, Some(Duration::from_millis(10)));
        // The peer may send exactly the window again.
        assert_eq!(flow.allowance, u64::from(MAX_FLOW_WINDOW));
    }

    #[test]
    fn a_slow_reader_s_window_never_grows() {
        let (mut flow, mut pool) = (Flow::new(), Pool::default());
        // It reads 128 KiB per round trip: bytes always wait unread when it grants.
        let windows =
            window_rounds(&mut flow, &mut pool, Instant::now(), Duration::from_millis(10), 50, Some(128 * 1024));
        assert!(windows.iter().all(|&w| w == INITIAL_WINDOW), "{windows:?}");
        assert_eq!(pool.grown, 0);
        assert_eq!(flow.allowance + flow.buffered as u64 + u64::from(flow.unacked), u64::from(INITIAL_WINDOW));
    }

    /// A request/response flow: 100 KiB per round trip of 10 ms, read at once; returns its window.
    fn request_response(pool: &mut Pool) -> u32 {
        let mut flow = Flow::new();
        let t0 = Instant::now();
        for k in 0..100 {
            let now = t0 + Duration::from_millis(10) * k;
            flow.received(100 * 1024, pool, || now);
            flow.unacked += 100 * 1024;
            flow.grant(pool, || now);
        }
        flow.window
    }

    #[test]
    fn a_flow_that_moves_less_than_half_its_window_per_round_trip_does_not_grow_for_long() {
        // With the round trip known (a bulk flow of the connection measured it), it never grows.
        let mut pool = Pool { grown: 0, min_rtt: Some(Duration::from_millis(10)) };
        assert_eq!(request_response(&mut pool), INITIAL_WINDOW);
        assert_eq!(pool.grown, 0);
        // Alone, it measures the time the peer took to use its window as the
        // round trip (20 ms: the peer was never blocked) and grows once.
        let mut pool = Pool::default();
        assert_eq!(request_response(&mut pool), 2 * INITIAL_WINDOW);
        assert_eq!(pool.min_rtt, Some(Duration::from_millis(20)));
    }

    #[test]
    fn windows_grow_out_of_a_shared_pool_that_a_closed_flow_returns() {
        let mut st = State::default();
        for id in 0..MAX_FLOWS_PER_CONNECTION as u32 {
            st.flows.insert(id, Box::new(Flow::new()));
        }
        // Every flow at its initial window leaves the growth pool.
        assert_eq!(st.windows(), BASE_RESERVATION);
        assert_eq!(CONN_BUFFER_CAP - st.windows(), GROWTH_POOL);
        let rtt = Duration::from_millis(10);
        let mut t = Instant::now();
        let mut grow = |st: &mut State, id: u32| {
            let State { flows, pool, .. } = st;
            window_rounds(flows.get_mut(&id).unwrap(), pool, t, rtt, 12, None);
            t += rtt * 12;
            assert!(st.windows() <= CONN_BUFFER_CAP, "{} > {CONN_BUFFER_CAP}", st.windows());
            st.flows[&id].window
        };
        // Two bulk flows take the whole pool; the others cannot grow.
        assert_eq!(grow(&mut st, 0), MAX_FLOW_WINDOW);
        assert_eq!(grow(&mut st, 1), MAX_FLOW_WINDOW);
        let third = grow(&mut st, 2);
        assert_eq!(third, INITIAL_WINDOW + (GROWTH_POOL - 2 * (MAX_FLOW_WINDOW - INITIAL_WINDOW) as usize) as u32);
        assert_eq!(st.windows(), CONN_BUFFER_CAP, "growth stops at the cap");
        for id in 3..MAX_FLOWS_PER_CONNECTION as u32 {
            assert_eq!(grow(&mut st, id), INITIAL_WINDOW);
        }
        assert_eq!(st.windows(), CONN_BUFFER_CAP);
        // A bulk flow that closes returns its growth: another flow grows into it.
        st.remove_flow(0).unwrap();
        assert_eq!(st.pool.grown, GROWTH_POOL - (MAX_FLOW_WINDOW - INITIAL_WINDOW) as usize);
        assert_eq!(grow(&mut st, 3), MAX_FLOW_WINDOW);
        assert_eq!(st.windows(), CONN_BUFFER_CAP - INITIAL_WINDOW as usize, "the closed flow's initial window is free");
        // A new flow still gets its initial window.
        st.flows.insert(100, Box::new(Flow::new()));
        assert_eq!(st.windows(), CONN_BUFFER_CAP);
    }

    /// Opens a flow to the gateway's flood (port 1) and reads 64 MiB of it.
    async fn read_flood(ep: &MuxConnection) -> MuxStream {
        let mut s = open_ok(ep, 1).await;
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < 64 * 1024 * 1024 {
            read += s.read(&mut buf).await.unwrap();
        }
        s
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_reader_s_window_grows_to_its_maximum_over_a_bulk_transfer() {
        // The clock stands still: every round trip measures zero, so the
        // window grows whenever the reader has caught up.
        let (ep, _gw) = pair_over(1024 * 1024);
        let s = read_flood(&ep).await;
        let st = ep.state();
        assert_eq!(st.flows[&s.id()].window, MAX_FLOW_WINDOW);
        assert_eq!(st.pool.grown, (MAX_FLOW_WINDOW - INITIAL_WINDOW) as usize);
        assert!(st.buffered <= MAX_FLOW_WINDOW as usize);
    }

    #[tokio::test(start_paused = true)]
    async fn a_flow_that_closes_returns_its_window_to_the_pool() {
        let (ep, _gw) = pair_over(1024 * 1024);
        let mut s = open_ok(&ep, 1).await;
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..1024 {
            s.read_exact(&mut buf).await.unwrap();
        }
        assert!(ep.state().pool.grown > 0);
        drop(s);
        assert_eq!(ep.state().pool.grown, 0);
    }

    #[tokio::test]
    async fn idle_flows_hold_no_buffers() {
        let (ep, _gw) = pair();
        let mut flows = Vec::new();
        for _ in 0..20 {
            let mut s = open_ok(&ep, 80).await;
            s.write_all(&[1u8; 50_000]).await.unwrap();
            let mut buf = vec![0u8; 50_000];
            s.read_exact(&mut buf).await.unwrap();
            flows.push(s);
        }
        for flow in ep.state().flows.values() {
            assert_eq!(flow.inbound.capacity(), 0, "an idle flow kept a receive queue");
            assert_eq!(flow.buffered, 0);
        }
        until(|| holds_no_send_buffer(&ep)).await;
    }

    /// Whether `conn` holds no send buffer above [`OUT_KEEP`] (its queue and its driver's batch).
    fn holds_no_send_buffer(conn: &MuxConnection) -> bool {
        let st = conn.state();
        st.out.capacity() <= OUT_KEEP && st.writing_capacity <= OUT_KEEP
    }

    #[tokio::test]
    async fn requests_and_answers_on_attached_flows_take_no_bulk_send_buffer() {
        let (ep, _gw) = pair();
        let (mut app, local) = local_pair().await;
        let _spliced = spawn_attached(local, open_ok(&ep, 80).await);
        let mut answer = [0u8; 200];
        for i in 0..100u8 {
            app.write_all(&[i; 200]).await.unwrap();
            app.read_exact(&mut answer).await.unwrap();
            assert_eq!(answer, [i; 200]);
        }
        assert_eq!(OUT_ALLOCATED.get(), 0, "small frames took a bulk send buffer");
        until(|| holds_no_send_buffer(&ep)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_transfer_reuses_two_send_buffers_and_an_idle_connection_gives_them_back() {
        let (ep, gw) = pair_over(1024 * 1024);
        let s = read_flood(&ep).await;
        // The flooding gateway queues 256 KiB batches: 256 of them came
        // through the same two buffers (the queue, the batch being written).
        assert!(OUT_ALLOCATED.get() <= 2, "{} send buffers allocated", OUT_ALLOCATED.get());
        drop(s);
        until(|| gw.flows() == 0 && holds_no_send_buffer(&gw)).await;
        let allocated = OUT_ALLOCATED.get();
        assert!(allocated >= 1);
        let spares = SPARE_OUT.with(|spares| spares.borrow().len());
        assert_eq!(spares, allocated, "the idle connection's send buffers are the thread's spares");
    }

    /// The raw end of a connection whose other end is a gateway [`MuxConnection`].
    async fn raw_to_gateway() -> (DuplexStream, MuxConnection) {
        let (mut raw, b) = tokio::io::duplex(4 * 1024 * 1024);
        let gw = MuxConnection::new(Side::Gateway);
        tokio::spawn(run(gw.clone(), tokio::io::BufReader::new(b)));
        raw.write_all(&mux::PREFACE).await.unwrap();
        (raw, gw)
    }

    /// [`raw_to_gateway`] with flow 1 opened and accepted.
    async fn raw_flow_to_gateway() -> (DuplexStream, MuxConnection, MuxStream) {
        let (mut raw, gw) = raw_to_gateway().await;
        let mut frames = Vec::new();
        mux::encode_open(1, &request(80), &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        let (stream, _) = gw.accept().await.unwrap();
        (raw, gw, stream)
    }

    /// `n` one-byte DATA frames of flow 1, carrying `0, 1, 2, …` (mod 256).
    fn one_byte_frames(n: u32) -> Vec<u8> {
        let mut frames = Vec::with_capacity(n as usize * (FRAME_HEADER_LEN + 1));
        for i in 0..n {
            mux::encode_header(mux::DATA, 1, 1, &mut frames);
            frames.push(i as u8);
        }
        frames
    }

    thread_local! {
        /// Writes to attached flows' local sockets on this thread.
        pub(super) static LOCAL_WRITES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    #[tokio::test]
    async fn tiny_frames_cost_one_write_per_read_not_one_per_frame() {
        let (mut raw, _gw, stream) = raw_flow_to_gateway().await;
        let (mut app, local) = local_pair().await;
        let _spliced = spawn_attached(local, stream);
        // 4,096 one-byte DATA frames in one write: the driver reads them 8 KiB at a time.
        let frames = one_byte_frames(4096);
        let reads = frames.len().div_ceil(8 * 1024);
        LOCAL_WRITES.with(|w| w.set(0));
        raw.write_all(&frames).await.unwrap();
        let mut got = vec![0u8; 4096];
        app.read_exact(&mut got).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, &b)| b == i as u8), "bytes out of order");
        let writes = LOCAL_WRITES.with(std::cell::Cell::get);
        assert!(writes <= 2 * reads + 2, "{writes} writes to the local socket for {reads} reads of 4,096 frames");
    }

    #[tokio::test]
    async fn one_byte_frames_cost_about_their_payload() {
        let (mut raw, gw, stream) = raw_flow_to_gateway().await;
        // A whole window of one-byte DATA frames, never read.
        let frames = one_byte_frames(INITIAL_WINDOW);
        raw.write_all(&frames).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while stream.buffered() < INITIAL_WINDOW as usize {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap();
        let held = {
            let st = gw.state();
            let inbound = &st.flows[&1].inbound;
            inbound.capacity() * std::mem::size_of::<Vec<u8>>() + inbound.iter().map(Vec::capacity).sum::<usize>()
        };
        assert!(
            held <= 2 * INITIAL_WINDOW as usize,
            "{held} bytes held for {INITIAL_WINDOW} bytes of payload in one-byte frames"
        );
    }

    #[test]
    fn a_queue_that_ebbs_and_fills_reuses_whole_chunks() {
        // TLS-record-sized pieces, as a flow whose local socket pushes back
        // queues them: every chunk but the last is whole, and once emptied
        // they are kept and given out again instead of being allocated anew.
        let spares = || SPARE_CHUNKS.lock().unwrap().len();
        let record = vec![7u8; 16 * 1024 + 29];
        let mut queue = VecDeque::new();
        let mut first = std::collections::HashSet::new();
        for _ in 0..12 {
            push_chunk(&mut queue, &record);
        }
        assert!(queue.iter().all(|c: &Vec<u8>| c.capacity() == CHUNK), "queued chunks are whole");
        let whole = queue.len();
        for chunk in queue.drain(..) {
            first.insert(chunk.as_ptr() as usize);
            spare_chunk(chunk);
        }
        assert_eq!(spares(), whole, "every emptied whole chunk is kept");
        for _ in 0..50 {
            for _ in 0..12 {
                push_chunk(&mut queue, &record);
            }
            assert_eq!(spares(), 0, "the queue filled from the spares");
            for chunk in queue.drain(..) {
                assert!(first.contains(&(chunk.as_ptr() as usize)), "a chunk was allocated anew");
                spare_chunk(chunk);
            }
        }
        // The process keeps a bounded number, and only whole chunks.
        spare_chunk(Vec::with_capacity(512));
        assert_eq!(spares(), whole);
        for _ in 0..2 * MAX_SPARE_CHUNKS {
            spare_chunk(Vec::with_capacity(CHUNK));
        }
        assert_eq!(spares(), MAX_SPARE_CHUNKS);
    }

    #[tokio::test]
    async fn flows_opened_and_closed_at_once_toward_a_peer_that_never_reads_leave_the_out_queue_bounded() {
        // The gateway end is never read: nothing the endpoint queues leaves.
        let (a, _b) = tokio::io::duplex(4096);
        let ep = MuxConnection::new(Side::Endpoint);
        tokio::spawn(run(ep.clone(), tokio::io::BufReader::new(a)));
        let mut opened = 0usize;
        for _ in 0..100_000 {
            match ep.open(&request(80)) {
                // A client that connects and closes at once: an OPEN, then a RESET.
                Ok(stream) => {
                    drop(stream);
                    opened += 1;
                }
                Err(OpenFlowError::Full) => break,
                Err(OpenFlowError::Closed(e)) => panic!("closed: {e}"),
            }
            tokio::task::yield_now().await;
        }
        let queued = ep.state().out.len();
        assert!(queued <= OUT_LIMIT + 1024, "{queued} bytes queued after {opened} flows");
        assert!(!ep.can_open() && opened > 100, "{opened} flows before the connection took no more");
    }

    #[tokio::test]
    async fn a_peer_that_sends_bad_opens_and_never_reads_leaves_the_out_queue_bounded() {
        let (raw, b) = tokio::io::duplex(64 * 1024);
        let gw = MuxConnection::new(Side::Gateway);
        tokio::spawn(run(gw.clone(), tokio::io::BufReader::new(b)));
        // Empty OPENs: each is answered with BadRequest and a reset, which the peer never reads.
        let mut frames = mux::PREFACE.to_vec();
        for id in 1..=100_000u32 {
            mux::encode_header(mux::OPEN, id, 0, &mut frames);
        }
        mux::encode_open(200_000, &request(80), &mut frames).unwrap();
        let (mut rd, mut wr) = tokio::io::split(raw);
        let mut writer = tokio::spawn(async move { wr.write_all(&frames).await.map(|()| wr) });
        // The gateway stops reading once its answers pile up: the writes stall.
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        let queued = gw.state().out.len();
        assert!(queued <= OUT_LIMIT + 1024, "{queued} bytes queued for a peer that does not read");
        assert!(gw.closed().is_none());
        // Once the peer reads, the gateway reads on and answers the good OPEN behind the bad ones.
        let acceptor = gw.clone();
        tokio::spawn(async move {
            while let Some((stream, _)) = acceptor.accept().await {
                stream.respond(&OpenResponse::new(OpenStatus::Ok, ""));
                std::mem::forget(stream);
            }
        });
        let answered = tokio::time::timeout(Duration::from_secs(20), async {
            let (mut seen, mut at, mut buf) = (Vec::new(), mux::PREFACE.len(), vec![0u8; 64 * 1024]);
            loop {
                let n = rd.read(&mut buf).await.unwrap();
                assert!(n > 0, "the gateway closed the connection");
                seen.extend_from_slice(&buf[..n]);
                while let Some(h) = mux::decode_header(&seen[at.min(seen.len())..]) {
                    if seen.len() < at + FRAME_HEADER_LEN + h.len as usize {
                        break;
                    }
                    if (h.kind, h.flow) == (mux::OPEN_RESPONSE, 200_000) {
                        return;
                    }
                    at += FRAME_HEADER_LEN + h.len as usize;
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "the gateway did not read on once its answers were read");
        writer.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_peer_that_overruns_its_window_loses_only_that_flow() {
        let (mut raw, gw) = raw_to_gateway().await;
        let mut frames = Vec::new();
        mux::encode_open(1, &request(80), &mut frames).unwrap();
        mux::encode_open(3, &request(80), &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        let (mut one, _) = gw.accept().await.unwrap();
        let (mut three, _) = gw.accept().await.unwrap();
        // More DATA on flow 1 than the window it was given.
        let mut flood = Vec::new();
        let mut sent = 0;
        while sent <= INITIAL_WINDOW as usize {
            mux::encode_header(mux::DATA, 1, MAX_DATA_LEN, &mut flood);
            flood.extend(std::iter::repeat_n(1u8, MAX_DATA_LEN));
            sent += MAX_DATA_LEN;
        }
        mux::encode_header(mux::DATA, 3, 5, &mut flood);
        flood.extend_from_slice(b"three");
        raw.write_all(&flood).await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), three.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"three");
        let mut sink = Vec::new();
        let err = tokio::time::timeout(Duration::from_secs(5), one.read_to_end(&mut sink)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
        assert!(sink.len() <= INITIAL_WINDOW as usize);
        assert!(gw.closed().is_none(), "the connection survives");
    }

    #[tokio::test]
    async fn an_empty_data_frame_resets_its_flow_only() {
        let (mut raw, gw) = raw_to_gateway().await;
        let mut frames = Vec::new();
        mux::encode_open(1, &request(80), &mut frames).unwrap();
        mux::encode_open(3, &request(80), &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        let (mut one, _) = gw.accept().await.unwrap();
        let (mut three, _) = gw.accept().await.unwrap();
        let mut frames = Vec::new();
        mux::encode_header(mux::DATA, 1, 0, &mut frames);
        mux::encode_header(mux::DATA, 3, 5, &mut frames);
        frames.extend_from_slice(b"three");
        raw.write_all(&frames).await.unwrap();
        let mut buf = [0u8; 5];
        tokio::time::timeout(Duration::from_secs(5), three.read_exact(&mut buf)).await.unwrap().unwrap();
        assert_eq!(&buf, b"three");
        let err = tokio::time::timeout(Duration::from_secs(5), one.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn an_open_from_the_gateway_side_is_reset_and_a_version_1_gateway_is_named() {
        // A gateway that opens a flow gets a reset of that flow; the endpoint accepts nothing.
        let (mut raw, b) = tokio::io::duplex(64 * 1024);
        let ep = MuxConnection::new(Side::Endpoint);
        tokio::spawn(run(ep.clone(), tokio::io::BufReader::new(b)));
        let mut frames = mux::PREFACE.to_vec();
        mux::encode_open(2, &request(22), &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        let mut got = vec![0u8; mux::PREFACE.len() + FRAME_HEADER_LEN];
        tokio::time::timeout(Duration::from_secs(5), raw.read_exact(&mut got)).await.unwrap().unwrap();
        let h = mux::decode_header(&got[mux::PREFACE.len()..]).unwrap();
        assert_eq!((h.kind, h.flow), (mux::RESET, 2));
        assert_eq!(ep.flows(), 0);

        // A version-1 gateway refuses the preface with a version-1 answer.
        let (mut raw, b) = tokio::io::duplex(64 * 1024);
        let ep = MuxConnection::new(Side::Endpoint);
        tokio::spawn(run(ep.clone(), tokio::io::BufReader::new(b)));
        let mut flow = ep.open(&request(80)).unwrap();
        let mut answer = Vec::new();
        trellis_proto::stream::encode_open_response(
            &OpenResponse::new(OpenStatus::BadRequest, "the peer speaks stream protocol version 2"),
            &mut answer,
        );
        raw.write_all(&answer).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), flow.response()).await.unwrap().unwrap_err();
        let why = flow.connection_error().map(|e| e.to_string()).unwrap_or_default();
        assert!(why.contains("upgrade the gateway agent"), "{why} / {err}");
    }

    #[tokio::test]
    async fn random_frames_never_take_the_gateway_down() {
        // Deterministic xorshift: frames with random types, flows and lengths, some bodies valid.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..200 {
            let (mut raw, gw) = raw_to_gateway().await;
            let acceptor = gw.clone();
            tokio::spawn(async move {
                while let Some((stream, _)) = acceptor.accept().await {
                    stream.respond(&OpenResponse::new(OpenStatus::Ok, ""));
                    drop(stream);
                }
            });
            let mut bytes = Vec::new();
            for _ in 0..(next() % 20) {
                let kind = (next() % 8) as u8;
                let flow = (next() % 6) as u32;
                match next() % 4 {
                    0 => mux::encode_open(flow, &request(80), &mut bytes).unwrap(),
                    1 => mux::encode_window(flow, (next() % 5_000_000) as u32 + 1, &mut bytes),
                    _ => {
                        let len = (next() % 3000) as usize;
                        mux::encode_header(kind, flow, len, &mut bytes);
                        bytes.extend((0..len).map(|_| next() as u8));
                    }
                }
            }
            let _ = raw.write_all(&bytes).await;
            // Whatever came, the connection still opens and answers a new flow.
            let mut open = Vec::new();
            mux::encode_open(u32::MAX - 1, &request(80), &mut open).unwrap();
            if raw.write_all(&open).await.is_err() || gw.closed().is_some() {
                continue;
            }
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let answered = tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    let n = raw.read(&mut buf).await.unwrap();
                    assert!(n > 0, "the gateway closed the connection over bad frames");
                    seen.extend_from_slice(&buf[..n]);
                    let mut at = mux::PREFACE.len().min(seen.len());
                    while let Some(h) = mux::decode_header(&seen[at..]) {
                        if seen.len() < at + FRAME_HEADER_LEN + h.len as usize {
                            break;
                        }
                        if h.kind == mux::OPEN_RESPONSE && h.flow == u32::MAX - 1 {
                            return;
                        }
                        at += FRAME_HEADER_LEN + h.len as usize;
                    }
                }
            })
            .await;
            assert!(answered.is_ok(), "no answer to a good OPEN after random frames");
        }
    }
}
