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
//! Memory: an idle flow holds a few dozen bytes of state here and no buffer.
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
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use trellis_proto::mux::{
    self, Control, FRAME_HEADER_LEN, INITIAL_WINDOW, MAX_DATA_LEN, MAX_FLOWS_PER_CONNECTION, MAX_WINDOW, Preface,
};
use trellis_proto::stream::{OpenRequest, OpenResponse, OpenStatus};

/// Writers wait while the connection has more than this queued for the stream.
pub const OUT_HIGH: usize = 256 * 1024;
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
/// A reader grants its bytes back to the peer once it has read this many.
const WINDOW_UPDATE_AT: u32 = INITIAL_WINDOW / 4;
/// The most one read from the stream takes.
const READ_CHUNK: usize = 64 * 1024;
/// Reads the driver does in one poll before it lets other tasks run.
const READS_PER_POLL: usize = 16;

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

#[derive(Default)]
struct State {
    flows: HashMap<u32, Flow>,
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
    /// The peer's version-2 preface arrived.
    greeted: bool,
    greeter: Option<Waker>,
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

    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        if let Some(w) = self.writer.take() {
            w.wake();
        }
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
    fn remove_flow(&mut self, id: u32) -> Option<Flow> {
        let flow = self.flows.remove(&id)?;
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

    /// Whether a new flow may be opened here.
    pub fn can_open(&self) -> bool {
        let st = self.state();
        st.closed.is_none()
            && !st.draining
            && !st.closing
            && !st.idle_done()
            && st.flows.len() < MAX_FLOWS_PER_CONNECTION
            && st.ids < u32::MAX
    }

    /// Endpoint side: opens a flow with `req` (the OPEN frame is queued at once).
    pub fn open(&self, req: &OpenRequest) -> Result<MuxStream, OpenFlowError> {
        debug_assert_eq!(self.shared.side, Side::Endpoint);
        let mut st = self.state();
        if let Some(e) = &st.closed {
            return Err(OpenFlowError::Closed(e.clone()));
        }
        if st.draining
            || st.closing
            || st.idle_done()
            || st.flows.len() >= MAX_FLOWS_PER_CONNECTION
            || st.ids == u32::MAX
        {
            return Err(OpenFlowError::Full);
        }
        let id = st.ids;
        let mut frame = Vec::new();
        mux::encode_open(id, req, &mut frame)
            .map_err(|e| OpenFlowError::Closed(Arc::new(io::Error::new(io::ErrorKind::InvalidInput, e))))?;
        st.ids += 1;
        st.out.extend_from_slice(&frame);
        st.flows.insert(id, Flow::new());
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
    S: AsyncRead + AsyncWrite + Unpin,
{
    let side = conn.shared.side;
    let mut driver = Driver {
        conn,
        io,
        rbuf: vec![0u8; READ_CHUNK + FRAME_HEADER_LEN + mux::MAX_CONTROL_LEN].into_boxed_slice(),
        start: 0,
        end: 0,
        writing: if side == Side::Endpoint { mux::PREFACE.to_vec() } else { Vec::new() },
        written: 0,
        flush: false,
        preface_seen: false,
        skip: 0,
        data: None,
        shut: false,
        held: false,
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
    rbuf: Box<[u8]>,
    /// `rbuf[start..end]` is received and not yet parsed.
    start: usize,
    end: usize,
    /// Frames being written (taken from `State::out`), from `written` on.
    writing: Vec<u8>,
    written: usize,
    flush: bool,
    preface_seen: bool,
    /// Body bytes of a skipped frame still to discard.
    skip: u64,
    /// A DATA body being received: flow, bytes left, whether the flow takes them.
    data: Option<(u32, usize, bool)>,
    shut: bool,
    /// Whole frames are left in `rbuf` until the out queue drains.
    held: bool,
    /// Reading stopped because control frames over [`OUT_LIMIT`] were queued.
    paused: bool,
    /// Bytes of `writing` that are control frames (counted whole until it is written).
    writing_control: usize,
}

/// Whether more than [`OUT_LIMIT`] of control frames waits to be written
/// (`writing_control` of them taken by the driver).
fn backlogged(st: &State, writing_control: usize) -> bool {
    st.out.len() - st.out_data + writing_control > OUT_LIMIT
}

fn closed_by_peer() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "the peer agent closed the tunnel connection")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<S> {
    /// `Ready(why)` when the connection is over.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        {
            let mut st = self.conn.state();
            if st.driver.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                st.driver = Some(cx.waker().clone());
            }
        }
        if let Poll::Ready(why) = self.poll_write(cx) {
            return Poll::Ready(why);
        }
        if let Poll::Ready(why) = self.poll_read(cx) {
            return Poll::Ready(why);
        }
        // Reading may have queued frames (window updates, resets, answers).
        if let Poll::Ready(why) = self.poll_write(cx) {
            return Poll::Ready(why);
        }
        // Reading stopped for the out queue, which is written now: nothing else would wake us.
        if self.paused && !backlogged(&self.conn.state(), self.writing_control) {
            self.paused = false;
            cx.waker().wake_by_ref();
        }
        Poll::Pending
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
                    std::mem::swap(&mut self.writing, &mut st.out);
                    self.writing_control = self.writing.len() - st.out_data;
                    st.out_data = 0;
                    // A large buffer is not kept around for an idle connection.
                    if st.out.capacity() > OUT_HIGH {
                        st.out = Vec::new();
                    }
                    for w in st.out_waiters.drain(..) {
                        w.wake();
                    }
                    continue;
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
            if self.held {
                // Frames received before the out queue filled up come first.
                self.held = false;
                if let Err(why) = self.parse() {
                    return Poll::Ready(why);
                }
                continue;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.rbuf.len() - self.end < FRAME_HEADER_LEN + mux::MAX_CONTROL_LEN {
                self.rbuf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let mut buf = ReadBuf::new(&mut self.rbuf[self.end..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    if n == 0 {
                        return Poll::Ready(closed_by_peer());
                    }
                    self.end += n;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(e),
                Poll::Pending => return Poll::Pending,
            }
            if let Err(why) = self.parse() {
                return Poll::Ready(why);
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Handles every whole frame (and every DATA byte) in `rbuf[start..end]`.
    fn parse(&mut self) -> Result<(), io::Error> {
        let side = self.conn.shared.side;
        let conn = self.conn.clone();
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
                    self.writing.clear();
                    self.written = 0;
                    self.writing_control = 0;
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
                if take
                    && let Some(flow) = st.flows.get_mut(&id)
                    && !flow.reset
                {
                    push_chunk(&mut flow.inbound, &self.rbuf[self.start..self.start + n]);
                    flow.buffered += n;
                    if let Some(w) = flow.reader.take() {
                        w.wake();
                    }
                    st.buffered += n;
                }
                self.start += n;
                self.data = if left == n { None } else { Some((id, left - n, take)) };
                continue;
            }
            let Some(h) = mux::decode_header(&self.rbuf[self.start..self.end]) else { return Ok(()) };
            if backlogged(st, self.writing_control) {
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
                st.flows.insert(id, Flow::new());
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

/// Appends received bytes to a flow's queue: into its last chunk while that
/// has room (up to [`CHUNK`]), else as a new chunk. A chunk's capacity stays
/// within twice its length (or 512 bytes), so memory follows the payload
/// however small the frames (a chunk per one-byte frame would cost ~59 bytes
/// per byte).
fn push_chunk(inbound: &mut VecDeque<Vec<u8>>, bytes: &[u8]) {
    if let Some(last) = inbound.back_mut()
        && last.len() + bytes.len() <= CHUNK
    {
        if last.capacity() - last.len() < bytes.len() {
            let want = (2 * last.len()).max(last.len() + bytes.len()).min(CHUNK);
            last.reserve_exact(want - last.len());
        }
        last.extend_from_slice(bytes);
        return;
    }
    let mut chunk = Vec::with_capacity(bytes.len().clamp(512, CHUNK));
    chunk.extend_from_slice(bytes);
    inbound.push_back(chunk);
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

    /// Unread bytes this flow holds (for tests).
    pub fn buffered(&self) -> usize {
        self.state().flows.get(&self.id).map_or(0, |f| f.buffered)
    }
}

impl AsyncRead for MuxStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let side = self.shared.side;
        let mut guard = self.state();
        let st = &mut *guard;
        let Some(flow) = st.flows.get_mut(&self.id) else { return Poll::Ready(Err(reset_error(side))) };
        if flow.reset {
            return Poll::Ready(Err(reset_error(side)));
        }
        if flow.inbound.is_empty() {
            if flow.recv_fin {
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = &st.closed {
                return Poll::Ready(Err(conn_error(e)));
            }
            flow.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let was_full = st.buffered > CONN_BUFFER_CAP;
        let mut taken = 0;
        while buf.remaining() > 0 {
            let Some(front) = flow.inbound.front() else { break };
            let n = buf.remaining().min(front.len() - flow.front_read);
            buf.put_slice(&front[flow.front_read..flow.front_read + n]);
            flow.front_read += n;
            taken += n;
            if flow.front_read == front.len() {
                flow.inbound.pop_front();
                flow.front_read = 0;
            }
        }
        if flow.inbound.is_empty() {
            flow.inbound = VecDeque::new();
        }
        flow.buffered -= taken;
        st.buffered -= taken;
        // Bounded by the window (u32), so it fits.
        flow.unacked += taken as u32;
        if let Some(more) = flow.grant(&mut st.pool, Instant::now) {
            mux::encode_window(self.id, more, &mut st.out);
            debug_assert!(st.windows() <= CONN_BUFFER_CAP);
            st.wake_driver();
        } else if was_full {
            st.wake_driver();
        }
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
        tokio::spawn(run(ep.clone(), a));
        tokio::spawn(run(gw.clone(), b));
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
    async fn echo(mut s: MuxStream, data: Vec<u8>) -> Vec<u8> {
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
            st.flows.insert(id, Flow::new());
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
        st.flows.insert(100, Flow::new());
        assert_eq!(st.windows(), CONN_BUFFER_CAP);
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_reader_s_window_grows_to_its_maximum_over_a_bulk_transfer() {
        // The clock stands still: every round trip measures zero, so the
        // window grows whenever the reader has caught up.
        let (ep, _gw) = pair_over(1024 * 1024);
        let mut s = open_ok(&ep, 1).await;
        let mut buf = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < 64 * 1024 * 1024 {
            read += s.read(&mut buf).await.unwrap();
        }
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
        let st = ep.state();
        for flow in st.flows.values() {
            assert_eq!(flow.inbound.capacity(), 0, "an idle flow kept a receive queue");
            assert_eq!(flow.buffered, 0);
        }
        assert!(st.out.capacity() <= OUT_HIGH, "the connection kept a large send buffer");
    }

    /// The raw end of a connection whose other end is a gateway [`MuxConnection`].
    async fn raw_to_gateway() -> (DuplexStream, MuxConnection) {
        let (mut raw, b) = tokio::io::duplex(4 * 1024 * 1024);
        let gw = MuxConnection::new(Side::Gateway);
        tokio::spawn(run(gw.clone(), b));
        raw.write_all(&mux::PREFACE).await.unwrap();
        (raw, gw)
    }

    #[tokio::test]
    async fn one_byte_frames_cost_about_their_payload() {
        let (mut raw, gw) = raw_to_gateway().await;
        let mut frames = Vec::new();
        mux::encode_open(1, &request(80), &mut frames).unwrap();
        raw.write_all(&frames).await.unwrap();
        let (stream, _) = gw.accept().await.unwrap();
        // A whole window of one-byte DATA frames, never read.
        let mut frames = Vec::with_capacity(INITIAL_WINDOW as usize * (FRAME_HEADER_LEN + 1));
        for i in 0..INITIAL_WINDOW {
            mux::encode_header(mux::DATA, 1, 1, &mut frames);
            frames.push(i as u8);
        }
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

    #[tokio::test]
    async fn a_peer_that_sends_bad_opens_and_never_reads_leaves_the_out_queue_bounded() {
        let (raw, b) = tokio::io::duplex(64 * 1024);
        let gw = MuxConnection::new(Side::Gateway);
        tokio::spawn(run(gw.clone(), b));
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
        tokio::spawn(run(ep.clone(), b));
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
        tokio::spawn(run(ep.clone(), b));
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
