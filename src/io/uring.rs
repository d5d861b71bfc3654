//! The io_uring backend's ring (`io_backend = "io_uring"`): one ring per shard thread, a
//! multishot accept on the shard's listener, a multishot receive per connection into one
//! per-shard provided buffer ring (no receive buffer per connection), a multishot poll on
//! the shard's epoll fd (the inbox waker and the TLS listener and connections stay on mio),
//! and a one-shot `POLLOUT` poll for a connection whose socket filled. Sends are the same
//! `send`/`sendmsg` calls as under epoll (`io::send_vectored`): what goes out, when, and how
//! it is accounted does not change with the backend.
//!
//! The shard loop that drives it is `shard::uring`; this module is the ring and its sans-IO
//! parts: what a completion means ([`Tag`], [`Completion`]), and the buffer ring's
//! bookkeeping ([`BufRing`]), with unit tests against a real ring.
//!
//! Why the `io-uring` crate and not tokio-uring: tokio-uring is a runtime of one future per
//! operation (a task per connection, or a join of every connection's futures), owns its
//! buffers per operation, and has no multishot receive into a provided buffer ring; a shard
//! needs one loop over completions with no task per connection. The `io-uring` crate maps the
//! ring and builds the submission entries, nothing more.
//!
//! Every entry this module submits is pointer-free (accept, receive into a buffer group,
//! poll, cancel) except a send ([`Ring::submit_send`], unsafe: its caller keeps the message
//! and its buffers until the completion), and the buffer ring lives as long as the ring (it
//! is dropped after it: field order).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::limits::{URING_BUFFERS, URING_BUFFER_BYTES, URING_CQ_ENTRIES, URING_SQ_ENTRIES};

/// The buffer group of the receive buffer ring (one per ring).
const BUF_GROUP: u16 = 0;

/// user_data of the multishot accept.
const UD_ACCEPT: u64 = u64::MAX;
/// user_data of the multishot poll on the epoll fd.
const UD_EPOLL: u64 = u64::MAX - 1;
/// user_data of cancel requests (their own completions are not looked at).
const UD_CANCEL: u64 = u64::MAX - 2;
/// Bits 30-31 of a connection's user_data say which of its requests a completion is for:
/// its receive (0), its `POLLOUT` poll (1) or its send (2). Slots under io_uring stay below
/// 2^30 ([`SLOT_LIMIT`]) and no generation is `u32::MAX`, so connection user_data never
/// collide with the three constants above.
const KIND_SHIFT: u32 = 30;
const KIND_POLLOUT: u64 = 1 << KIND_SHIFT;
const KIND_SEND: u64 = 2 << KIND_SHIFT;
const SLOT_MASK: u64 = (1 << KIND_SHIFT) - 1;

/// Slots a shard on io_uring can use (the user_data's slot field).
pub const SLOT_LIMIT: u32 = 1 << KIND_SHIFT;

/// What a completion is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// The listener's multishot accept: `result` is a new fd, or an error.
    Accept,
    /// The epoll fd is readable: mio has events (the waker, TLS sockets).
    Epoll,
    /// A connection's multishot receive.
    Recv { slot: u32, gen: u32 },
    /// A connection's socket has room again.
    PollOut { slot: u32, gen: u32 },
    /// A connection's send: `result` is the bytes the kernel took, or an error.
    Send { slot: u32, gen: u32 },
    /// A cancel request's own completion.
    Cancel,
}

/// The user_data of a connection's receive.
pub fn recv_data(slot: u32, gen: u32) -> u64 {
    debug_assert!(slot < SLOT_LIMIT);
    (u64::from(gen) << 32) | u64::from(slot)
}

/// The user_data of a connection's `POLLOUT` poll.
pub fn pollout_data(slot: u32, gen: u32) -> u64 {
    recv_data(slot, gen) | KIND_POLLOUT
}

/// The user_data of a connection's send.
pub fn send_data(slot: u32, gen: u32) -> u64 {
    recv_data(slot, gen) | KIND_SEND
}

impl Tag {
    pub fn of(user_data: u64) -> Tag {
        match user_data {
            UD_ACCEPT => Tag::Accept,
            UD_EPOLL => Tag::Epoll,
            UD_CANCEL => Tag::Cancel,
            d => {
                let slot = (d & SLOT_MASK) as u32;
                let gen = (d >> 32) as u32;
                match d & (3 << KIND_SHIFT) {
                    KIND_POLLOUT => Tag::PollOut { slot, gen },
                    KIND_SEND => Tag::Send { slot, gen },
                    _ => Tag::Recv { slot, gen },
                }
            }
        }
    }
}

/// One completion, copied out of the completion queue so the shard can submit while it
/// handles them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    pub fn tag(&self) -> Tag {
        Tag::of(self.user_data)
    }

    /// The multishot request goes on (false: it ended and must be armed again to go on).
    pub fn more(&self) -> bool {
        cqueue::more(self.flags)
    }

    /// The provided buffer this completion filled, if any (it must go back to the ring).
    pub fn buffer(&self) -> Option<u16> {
        cqueue::buffer_select(self.flags)
    }
}

/// What a receive completion asks of its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecvOutcome {
    /// `len` bytes in buffer `bid`.
    Data { bid: u16, len: usize },
    /// The peer closed its side (EOF).
    Eof,
    /// The buffer ring was empty: nothing lost, arm the receive again once buffers are back.
    NoBuffers,
    /// Cancelled by us (the connection is closing): nothing to do.
    Cancelled,
    /// A socket error (reset, timed out): the connection is gone.
    Error(i32),
}

/// The meaning of a receive completion (sans-IO; `shard::uring` acts on it).
pub fn recv_outcome(c: &Completion) -> RecvOutcome {
    match c.result {
        n if n > 0 => match c.buffer() {
            Some(bid) => RecvOutcome::Data {
                bid,
                len: n as usize,
            },
            // A receive with buffer select always names its buffer; without one nothing
            // can be read, so the connection cannot go on.
            None => RecvOutcome::Error(libc::EINVAL),
        },
        0 => RecvOutcome::Eof,
        e if e == -libc::ENOBUFS => RecvOutcome::NoBuffers,
        e if e == -libc::ECANCELED => RecvOutcome::Cancelled,
        e => RecvOutcome::Error(-e),
    }
}

/// A provided buffer ring: `URING_BUFFERS` buffers of `URING_BUFFER_BYTES` in one
/// allocation, and the ring of entries the kernel takes them from. A buffer the kernel filled
/// is the shard's until [`BufRing::give_back`]; [`BufRing::publish`] makes returned buffers
/// visible to the kernel again (once per loop turn).
pub struct BufRing {
    /// The entries, page-aligned (mmap), `count` of them; the tail is in entry 0's reserved
    /// field.
    entries: *mut types::BufRingEntry,
    entries_bytes: usize,
    mem: Box<[u8]>,
    count: u16,
    size: usize,
    tail: u16,
}

impl BufRing {
    /// Map the entries and fill them with every buffer; not yet registered.
    fn new(count: u16, size: usize) -> io::Result<BufRing> {
        assert!(
            count.is_power_of_two(),
            "buffer ring size must be a power of two"
        );
        let entries_bytes = usize::from(count) * std::mem::size_of::<types::BufRingEntry>();
        // SAFETY: an anonymous private mapping of `entries_bytes`; no address hint, no fd.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                entries_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Written once now, so the buffers are resident from the start: the kernel takes them
        // in ring order, so every one is touched within the first `count` receives anyway,
        // and the process's memory should not seem to grow with its first connections.
        let mut mem = vec![0u8; usize::from(count) * size].into_boxed_slice();
        for page in mem.chunks_mut(4096) {
            page[0] = 1;
        }
        let mut ring = BufRing {
            entries: ptr.cast(),
            entries_bytes,
            mem,
            count,
            size,
            tail: 0,
        };
        for bid in 0..count {
            ring.give_back(bid);
        }
        ring.publish();
        Ok(ring)
    }

    /// Return buffer `bid` to the ring (seen by the kernel after [`BufRing::publish`]).
    pub fn give_back(&mut self, bid: u16) {
        debug_assert!(bid < self.count);
        let idx = usize::from(self.tail & (self.count - 1));
        let addr = self.mem.as_ptr() as u64 + u64::from(bid) * self.size as u64;
        // SAFETY: `idx < count`, inside the mapping; the kernel only reads entries between
        // its head and the published tail, and this one is past the tail until `publish`.
        // The setters write addr, len and bid, never the reserved field that is the tail.
        let e = unsafe { &mut *self.entries.add(idx) };
        e.set_addr(addr);
        e.set_len(self.size as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Make every returned buffer visible to the kernel.
    pub fn publish(&self) {
        // SAFETY: the tail is a u16 inside the mapping (entry 0's reserved field), shared with
        // the kernel, which reads it with acquire semantics; `AtomicU16` has u16's layout.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    /// The first `len` bytes of buffer `bid`, as the kernel filled them.
    pub fn data(&mut self, bid: u16, len: usize) -> &mut [u8] {
        let start = usize::from(bid) * self.size;
        &mut self.mem[start..start + len.min(self.size)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the ring that used it is gone
        // (the `Ring` field order drops the `IoUring` first).
        unsafe {
            libc::munmap(self.entries.cast(), self.entries_bytes);
        }
    }
}

/// A shard's ring and its receive buffers.
pub struct Ring {
    // Field order matters: the ring (and with it every request that could still write into
    // a buffer) is dropped before the buffers.
    ring: IoUring,
    pub bufs: BufRing,
}

impl Ring {
    /// A ring for the calling thread (single issuer), its buffer ring registered.
    pub fn new() -> io::Result<Ring> {
        Ring::with_sizes(
            URING_SQ_ENTRIES,
            URING_CQ_ENTRIES,
            URING_BUFFERS,
            URING_BUFFER_BYTES,
        )
    }

    fn with_sizes(sq: u32, cq: u32, buffers: u16, buffer_bytes: usize) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_cqsize(cq)
            // Completions are posted when this thread next enters the kernel, not by an
            // interrupt of whatever it is doing.
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(sq)?;
        let bufs = BufRing::new(buffers, buffer_bytes)?;
        // SAFETY: `bufs.entries` is a page-aligned mapping of `buffers` entries that stays
        // valid until after the ring is dropped (field order of `Ring`).
        unsafe {
            ring.submitter().register_buf_ring_with_flags(
                bufs.entries as u64,
                buffers,
                BUF_GROUP,
                0,
            )?;
        }
        Ok(Ring { ring, bufs })
    }

    fn push(&mut self, e: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: an entry's pointers (a send's message) are valid until its completion, by
            // `submit_send`'s contract; the others carry none.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            // The submission queue is full: hand it to the kernel and go on.
            match self.ring.submit() {
                Ok(_) => {}
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {}
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
    }

    /// Arm the listener's multishot accept (new sockets non-blocking, close-on-exec).
    pub fn arm_accept(&mut self, listener: RawFd) -> io::Result<()> {
        self.push(
            opcode::AcceptMulti::new(types::Fd(listener))
                .flags(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)
                .build()
                .user_data(UD_ACCEPT),
        )
    }

    /// Arm a multishot poll for input on the epoll fd.
    pub fn arm_epoll(&mut self, epoll: RawFd) -> io::Result<()> {
        self.push(
            opcode::PollAdd::new(types::Fd(epoll), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(UD_EPOLL),
        )
    }

    /// Arm a connection's multishot receive into the buffer ring.
    pub fn arm_recv(&mut self, fd: RawFd, slot: u32, gen: u32) -> io::Result<()> {
        self.push(
            opcode::RecvMulti::new(types::Fd(fd), BUF_GROUP)
                .build()
                .user_data(recv_data(slot, gen)),
        )
    }

    /// Arm a one-shot poll for room to write on a connection.
    pub fn arm_pollout(&mut self, fd: RawFd, slot: u32, gen: u32) -> io::Result<()> {
        self.push(
            opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                .build()
                .user_data(pollout_data(slot, gen)),
        )
    }

    /// Submit `msg` on `fd` as a `sendmsg` (MSG_NOSIGNAL) under `user_data`.
    ///
    /// # Safety
    /// `msg`, its iovec array and every buffer it names must stay valid and unmoved until
    /// this request's completion has been reaped (`shard::uring::SendOp` holds them, and the
    /// frames' `Arc`s, until then).
    pub unsafe fn submit_send(
        &mut self,
        fd: RawFd,
        msg: *const libc::msghdr,
        user_data: u64,
    ) -> io::Result<()> {
        self.push(
            opcode::SendMsg::new(types::Fd(fd), msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(user_data),
        )
    }

    /// Submit one buffer on `fd` as a `send` (MSG_NOSIGNAL) under `user_data`: no message
    /// header for the kernel to copy in, as `io::send_vectored` prefers `send` for one buffer.
    ///
    /// # Safety
    /// The buffer `iov` names must stay valid and unmoved until this request's completion has
    /// been reaped.
    pub unsafe fn submit_send_one(
        &mut self,
        fd: RawFd,
        iov: &libc::iovec,
        user_data: u64,
    ) -> io::Result<()> {
        self.push(
            opcode::Send::new(
                types::Fd(fd),
                iov.iov_base as *const u8,
                iov.iov_len.min(u32::MAX as usize) as u32,
            )
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data),
        )
    }

    /// Cancel the request armed with `user_data` (its completion says `ECANCELED`; one that
    /// already ended is not found, which is fine).
    pub fn cancel(&mut self, user_data: u64) -> io::Result<()> {
        self.push(
            opcode::AsyncCancel::new(user_data)
                .build()
                .user_data(UD_CANCEL),
        )
    }

    /// Close the ring and leak the receive buffers (and their ring of entries): the kernel
    /// ends a closed ring's requests in the background, and a multishot receive could still
    /// fill a buffer. Only when a shard ends, so at most once per shard.
    pub fn close_leaking_buffers(self) {
        let Ring { ring, bufs } = self;
        drop(ring);
        std::mem::forget(bufs);
    }

    /// Submit what was armed and wait up to `timeout` for at least one completion (zero:
    /// do not wait).
    pub fn submit_and_wait(&mut self, timeout: Duration) -> io::Result<()> {
        let r = if timeout.is_zero() {
            self.ring.submit()
        } else {
            let ts = types::Timespec::from(timeout);
            let args = types::SubmitArgs::new().timespec(&ts);
            self.ring.submitter().submit_with_args(1, &args)
        };
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Move every completion into `out` (appended).
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            out.push(Completion {
                user_data: cqe.user_data(),
                result: cqe.result(),
                flags: cqe.flags(),
            });
        }
    }
}

/// Whether this kernel runs the io_uring backend, and if not why: a ring with the shard's
/// setup, a registered buffer ring, and the kernel version multishot receive needs (6.0).
pub fn probe() -> Result<(), String> {
    let release = kernel_release();
    if let Some((major, _)) = parse_release(&release) {
        if major < 6 {
            return Err(format!(
                "kernel {release} is older than 6.0 (multishot receive)"
            ));
        }
    }
    match Ring::with_sizes(8, 16, 2, 4096) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.raw_os_error() {
            Some(libc::EPERM) => format!(
                "io_uring_setup refused: {e} (kernel.io_uring_disabled, or a seccomp profile)"
            ),
            Some(libc::ENOSYS) => format!("io_uring_setup is not available: {e}"),
            Some(libc::ENOMEM) => format!(
                "io_uring_setup failed: {e} (RLIMIT_MEMLOCK too low on kernels before 5.12)"
            ),
            _ => format!("io_uring_setup failed: {e}"),
        }),
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// (major, minor) of a kernel release such as `6.18.44-fc-v1252`.
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn user_data_round_trips_and_never_collides_with_the_constants() {
        for (slot, gen) in [(0, 1), (1, 7), (SLOT_LIMIT - 1, u32::MAX - 1)] {
            assert_eq!(Tag::of(recv_data(slot, gen)), Tag::Recv { slot, gen });
            assert_eq!(Tag::of(pollout_data(slot, gen)), Tag::PollOut { slot, gen });
            assert_eq!(Tag::of(send_data(slot, gen)), Tag::Send { slot, gen });
            for c in [UD_ACCEPT, UD_EPOLL, UD_CANCEL] {
                assert_ne!(recv_data(slot, gen), c);
                assert_ne!(pollout_data(slot, gen), c);
                assert_ne!(send_data(slot, gen), c);
            }
        }
        assert_eq!(Tag::of(UD_ACCEPT), Tag::Accept);
        assert_eq!(Tag::of(UD_EPOLL), Tag::Epoll);
        assert_eq!(Tag::of(UD_CANCEL), Tag::Cancel);
    }

    #[test]
    fn recv_outcomes() {
        let c = |result, flags| Completion {
            user_data: 0,
            result,
            flags,
        };
        // IORING_CQE_F_BUFFER (bit 0), the buffer id in the upper 16 bits (io_uring.h).
        let buf = |bid: u32| 1 | (bid << 16);
        assert_eq!(
            recv_outcome(&c(10, buf(3))),
            RecvOutcome::Data { bid: 3, len: 10 }
        );
        assert_eq!(recv_outcome(&c(0, 0)), RecvOutcome::Eof);
        assert_eq!(recv_outcome(&c(-libc::ENOBUFS, 0)), RecvOutcome::NoBuffers);
        assert_eq!(
            recv_outcome(&c(-libc::ECANCELED, 0)),
            RecvOutcome::Cancelled
        );
        assert_eq!(
            recv_outcome(&c(-libc::ECONNRESET, 0)),
            RecvOutcome::Error(libc::ECONNRESET)
        );
        // Data without a buffer cannot be read: an error, never a panic.
        assert_eq!(recv_outcome(&c(5, 0)), RecvOutcome::Error(libc::EINVAL));
    }

    #[test]
    fn release_parsing() {
        assert_eq!(parse_release("6.18.44-fc-v1252"), Some((6, 18)));
        assert_eq!(parse_release("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(parse_release("garbage"), None);
    }

    /// A small ring for a test, or None (said on stderr) on a kernel that refuses io_uring,
    /// unless SB_REQUIRE_IO_URING=1 (tests/run-all.sh's rule for the io_uring passes).
    fn ring(buffers: u16) -> Option<Ring> {
        match probe() {
            Ok(()) => Some(Ring::with_sizes(64, 128, buffers, 4096).unwrap()),
            Err(why) if std::env::var("SB_REQUIRE_IO_URING").as_deref() != Ok("1") => {
                eprintln!("io_uring is not available here, test not run: {why}");
                None
            }
            Err(why) => panic!("io_uring is required (SB_REQUIRE_IO_URING=1) but: {why}"),
        }
    }

    /// Wait for completions until `done` says so (bounded).
    fn wait_for(ring: &mut Ring, got: &mut Vec<Completion>, done: impl Fn(&[Completion]) -> bool) {
        for _ in 0..200 {
            ring.submit_and_wait(Duration::from_millis(20)).unwrap();
            ring.reap(got);
            if done(got) {
                return;
            }
        }
        panic!("completions never arrived: {got:?}");
    }

    /// A connected pair whose server side cannot take another byte (nobody reads the client).
    fn full_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let (client, server) = pair();
        let mut s = &server;
        let chunk = [0u8; 65536];
        while s.write(&chunk).is_ok() {}
        (client, server)
    }

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_nonblocking(true).unwrap();
        (c, s)
    }

    #[test]
    fn multishot_accept_and_receive_into_the_buffer_ring() {
        let Some(mut ring) = ring(4) else { return };
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        ring.arm_accept(l.as_raw_fd()).unwrap();
        let mut a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let _b = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut got = Vec::new();
        wait_for(&mut ring, &mut got, |g| {
            g.iter().filter(|c| c.tag() == Tag::Accept).count() == 2
        });
        let fds: Vec<RawFd> = got.iter().map(|c| c.result).collect();
        assert!(fds.iter().all(|&fd| fd >= 0), "{got:?}");
        assert!(
            got.iter().all(Completion::more),
            "multishot accept ended: {got:?}"
        );
        // SAFETY (test): fresh fds from accept, owned here only.
        let socks: Vec<std::net::TcpStream> = fds
            .iter()
            .map(|&fd| unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) })
            .collect();
        // Which accepted socket is `a`'s: the one whose peer is a's local address.
        let a_local = a.local_addr().unwrap();
        let sa = socks
            .iter()
            .find(|s| s.peer_addr().unwrap() == a_local)
            .unwrap();
        ring.arm_recv(sa.as_raw_fd(), 5, 9).unwrap();
        a.write_all(b"hello").unwrap();
        got.clear();
        wait_for(&mut ring, &mut got, |g| !g.is_empty());
        assert_eq!(got[0].tag(), Tag::Recv { slot: 5, gen: 9 });
        let RecvOutcome::Data { bid, len } = recv_outcome(&got[0]) else {
            panic!("{got:?}");
        };
        assert_eq!(ring.bufs.data(bid, len), b"hello");
        assert!(got[0].more());
        ring.bufs.give_back(bid);
        ring.bufs.publish();
        // EOF ends the multishot receive.
        drop(a);
        got.clear();
        wait_for(&mut ring, &mut got, |g| !g.is_empty());
        assert_eq!(recv_outcome(&got[0]), RecvOutcome::Eof);
        assert!(!got[0].more());
    }

    #[test]
    fn an_empty_buffer_ring_says_enobufs_and_nothing_is_lost_after_rearming() {
        let Some(mut ring) = ring(2) else { return };
        let (mut client, server) = pair();
        ring.arm_recv(server.as_raw_fd(), 1, 1).unwrap();
        let mut got = Vec::new();
        let mut data = Vec::new();
        let mut held = Vec::new();
        // Three writes into two buffers: the receive ends with ENOBUFS while both are held.
        for chunk in [&b"one|"[..], b"two|", b"three"] {
            client.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(20));
            ring.submit_and_wait(Duration::from_millis(20)).unwrap();
            ring.reap(&mut got);
        }
        wait_for(&mut ring, &mut got, |g| {
            g.iter().any(|c| recv_outcome(c) == RecvOutcome::NoBuffers)
        });
        for c in got.drain(..) {
            if let RecvOutcome::Data { bid, len } = recv_outcome(&c) {
                data.extend_from_slice(ring.bufs.data(bid, len));
                held.push(bid);
            }
        }
        assert_eq!(held.len(), 2);
        for bid in held {
            ring.bufs.give_back(bid);
        }
        ring.bufs.publish();
        ring.arm_recv(server.as_raw_fd(), 1, 1).unwrap();
        wait_for(&mut ring, &mut got, |g| {
            g.iter()
                .any(|c| matches!(recv_outcome(c), RecvOutcome::Data { .. }))
        });
        for c in got.drain(..) {
            if let RecvOutcome::Data { bid, len } = recv_outcome(&c) {
                data.extend_from_slice(ring.bufs.data(bid, len));
                ring.bufs.give_back(bid);
            }
        }
        assert_eq!(data, b"one|two|three");
    }

    #[test]
    fn cancelling_a_receive_and_a_pollout_ends_both() {
        let Some(mut ring) = ring(2) else { return };
        // A full socket, so POLLOUT stays pending.
        let (_client, server) = full_pair();
        ring.arm_recv(server.as_raw_fd(), 3, 4).unwrap();
        ring.arm_pollout(server.as_raw_fd(), 3, 4).unwrap();
        ring.submit_and_wait(Duration::ZERO).unwrap();
        ring.cancel(recv_data(3, 4)).unwrap();
        ring.cancel(pollout_data(3, 4)).unwrap();
        let mut got = Vec::new();
        wait_for(&mut ring, &mut got, |g| {
            g.iter().filter(|c| c.tag() != Tag::Cancel).count() == 2
        });
        for c in got.iter().filter(|c| c.tag() != Tag::Cancel) {
            assert_eq!(c.result, -libc::ECANCELED, "{c:?}");
            assert!(!c.more());
        }
    }

    /// A sendmsg of `data` through the ring, owning what the kernel reads until the test
    /// drops it (after reaping the completion): the bytes, the iovec and the message, boxed
    /// so their addresses stay put.
    struct RingSend {
        data: Vec<u8>,
        _iov: Box<libc::iovec>,
        _msg: Box<libc::msghdr>,
    }

    impl RingSend {
        fn submit(ring: &mut Ring, fd: RawFd, data: Vec<u8>, ud: u64) -> RingSend {
            let mut iov = Box::new(libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            });
            // SAFETY (test): plain data.
            let mut msg: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
            msg.msg_iov = &mut *iov;
            msg.msg_iovlen = 1;
            // SAFETY (test): `msg`, `iov` and `data` are owned by the returned value, which
            // each test keeps until the send's completion is reaped.
            unsafe { ring.submit_send(fd, &*msg, ud).unwrap() };
            RingSend {
                data,
                _iov: iov,
                _msg: msg,
            }
        }
    }

    #[test]
    fn a_send_to_a_full_socket_waits_in_the_ring_until_the_peer_reads() {
        let Some(mut ring) = ring(2) else { return };
        let (mut client, server) = full_pair();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let send = RingSend::submit(&mut ring, server.as_raw_fd(), data, send_data(4, 4));
        let mut got = Vec::new();
        ring.submit_and_wait(Duration::from_millis(50)).unwrap();
        ring.reap(&mut got);
        assert!(
            got.is_empty(),
            "a send to a full socket completed at once: {got:?}"
        );
        // The peer reads: the send completes with what the kernel took (all of it, or a
        // short count the shard would commit and send the rest of).
        client.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let mut read = 0usize;
        let started = std::time::Instant::now();
        while got.is_empty() && started.elapsed() < Duration::from_secs(5) {
            read += client.read(&mut sink).unwrap_or(0);
            ring.submit_and_wait(Duration::from_millis(10)).unwrap();
            ring.reap(&mut got);
        }
        assert_eq!(got[0].tag(), Tag::Send { slot: 4, gen: 4 });
        assert!(
            got[0].result > 0 && got[0].result as usize <= send.data.len(),
            "{got:?}"
        );
        assert!(read > 0);
        drop(send);
    }

    #[test]
    fn a_send_cancelled_in_the_ring_completes_before_its_buffer_is_freed() {
        let Some(mut ring) = ring(2) else { return };
        let (_client, server) = full_pair();
        let send = RingSend::submit(
            &mut ring,
            server.as_raw_fd(),
            vec![7u8; 50_000],
            send_data(6, 1),
        );
        ring.submit_and_wait(Duration::ZERO).unwrap();
        // What a connection closed with a send in flight does: cancel, keep the buffer until
        // the send's own completion.
        ring.cancel(send_data(6, 1)).unwrap();
        let mut got = Vec::new();
        wait_for(&mut ring, &mut got, |g| {
            g.iter().any(|c| c.tag() == Tag::Send { slot: 6, gen: 1 })
        });
        let c = got
            .iter()
            .find(|c| c.tag() == Tag::Send { slot: 6, gen: 1 })
            .unwrap();
        assert!(c.result == -libc::ECANCELED || c.result >= 0, "{c:?}");
        drop(send);
    }

    #[test]
    fn pollout_fires_once_the_peer_reads() {
        let Some(mut ring) = ring(2) else { return };
        let (mut client, server) = full_pair();
        ring.arm_pollout(server.as_raw_fd(), 2, 2).unwrap();
        let mut got = Vec::new();
        ring.submit_and_wait(Duration::from_millis(50)).unwrap();
        ring.reap(&mut got);
        assert!(got.is_empty(), "POLLOUT on a full socket: {got:?}");
        client.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let started = std::time::Instant::now();
        while got.is_empty() && started.elapsed() < Duration::from_secs(5) {
            let _ = client.read(&mut sink);
            ring.submit_and_wait(Duration::from_millis(10)).unwrap();
            ring.reap(&mut got);
        }
        assert_eq!(got[0].tag(), Tag::PollOut { slot: 2, gen: 2 });
        assert!(got[0].result > 0 && got[0].result & libc::POLLOUT as i32 != 0);
    }
}
