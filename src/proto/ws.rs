//! WebSocket framing (RFC 6455), server side, sans-IO.
//!
//! tungstenite does the header work: [`FrameHeader::parse`] reads headers and rejects reserved
//! opcodes, [`CloseCode`] classifies close codes. Unmasking is ours ([`apply_mask`]: tungstenite
//! 0.30 keeps its own private), eight bytes at a time, tested against the byte-wise definition:
//! 21 ns per KiB against 201 ns byte-wise (`cargo bench --bench proto`, docs/BENCHMARKS.md). What tungstenite's
//! `WebSocketContext` would add per connection — a `BytesMut` read buffer, an output `Vec`, and
//! ~200 B of state, built from a `WebSocketConfig` whose defaults allocate 128 KiB — is exactly
//! what the per-connection memory budget cannot afford. So the shard reads into one per-shard
//! buffer, frames are decoded in place from it, and a connection keeps bytes only while a frame
//! or a fragmented message is incomplete ([`RxState`], boxed, absent when idle).
//!
//! Rules enforced (each maps to a close code): client frames must be masked, RSV bits zero,
//! no reserved opcodes, control frames final and <= 125 bytes, continuation only inside a
//! fragmented message (all 1002); text must be UTF-8, checked fail-fast across fragments and
//! while one large frame is still arriving (1007);
//! a message above the configured maximum is refused from its header alone (1009).

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Close codes used by the server (PROTOCOL.md section 8).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const INVALID_DATA: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const INTERNAL: u16 = 1011;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const TOKEN_EXPIRED: u16 = 4003;
    pub const SLOW_CONSUMER: u16 = 4008;
    pub const RATE_LIMITED: u16 = 4029;
}

/// WebSocket opcodes as bytes.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A protocol violation by the peer. The connection must be closed with [`WsError::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsError {
    /// Framing rule broken (unmasked, RSV set, bad opcode, bad control frame, bad continuation).
    Protocol(&'static str),
    /// Text or close reason is not UTF-8.
    InvalidUtf8,
    /// Message larger than the configured maximum.
    TooBig,
}

impl WsError {
    /// The close code to send.
    pub fn code(self) -> u16 {
        match self {
            WsError::Protocol(_) => close::PROTOCOL,
            WsError::InvalidUtf8 => close::INVALID_DATA,
            WsError::TooBig => close::TOO_BIG,
        }
    }

    /// The close reason to send (short, no peer data).
    pub fn reason(self) -> &'static str {
        match self {
            WsError::Protocol(why) => why,
            WsError::InvalidUtf8 => "invalid UTF-8",
            WsError::TooBig => "message too large",
        }
    }
}

/// One complete inbound event. Payload slices point into the caller's buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEvent<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// The peer started the close handshake; `None` when it sent no status code.
    Close(Option<u16>),
}

/// Per-connection receive state, allocated only while something is incomplete.
///
/// Byte budget: 2 x `Vec` (48 B) + 8 B of bookkeeping, plus the bytes held.
#[derive(Debug, Default)]
pub struct RxState {
    /// Unparsed bytes of an incomplete frame (or of an incomplete HTTP request head).
    pub partial: Vec<u8>,
    /// Payload of a fragmented message gathered so far.
    pub fragments: Vec<u8>,
    /// Opcode of the fragmented message in progress (TEXT or BINARY), 0 when none.
    pub frag_opcode: u8,
    /// Prefix of `fragments` already known to be valid UTF-8.
    pub utf8_checked: u32,
    /// Payload prefix of the incomplete text frame in `partial` already known to be valid
    /// UTF-8 (fail-fast while a large frame is still arriving); 0 when a new frame starts.
    pub partial_checked: u32,
}

impl RxState {
    /// Nothing incomplete is held: the state can be dropped.
    pub fn is_idle(&self) -> bool {
        self.partial.is_empty() && self.frag_opcode == 0
    }
}

/// Result of decoding one frame from a buffer.
pub enum Decoded {
    /// More bytes are needed; nothing was consumed.
    NeedMore,
    /// A frame: its header facts, payload range within the buffer (already unmasked), and the
    /// bytes consumed.
    Frame {
        fin: bool,
        opcode: u8,
        payload: std::ops::Range<usize>,
        consumed: usize,
    },
}

/// Decode one frame at the start of `buf`, unmasking its payload in place.
///
/// `max_payload` is the largest payload accepted for this frame (the caller subtracts what a
/// fragmented message already holds).
pub fn decode_frame(buf: &mut [u8], max_payload: usize) -> Result<Decoded, WsError> {
    let mut cursor = Cursor::new(&*buf);
    let (header, len) = match FrameHeader::parse(&mut cursor) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Decoded::NeedMore),
        Err(_) => return Err(WsError::Protocol("reserved opcode")),
    };
    let header_len = cursor.position() as usize;
    if header.rsv1 || header.rsv2 || header.rsv3 {
        return Err(WsError::Protocol("reserved bits set"));
    }
    let Some(mask) = header.mask else {
        return Err(WsError::Protocol("client frames must be masked"));
    };
    let op = opcode_byte(header.opcode);
    let is_control = op >= 0x8;
    if is_control {
        if !header.is_final {
            return Err(WsError::Protocol("fragmented control frame"));
        }
        if len > 125 {
            return Err(WsError::Protocol("control frame too long"));
        }
    } else if len > max_payload as u64 {
        return Err(WsError::TooBig);
    }
    let len = len as usize;
    if buf.len() - header_len < len {
        return Ok(Decoded::NeedMore);
    }
    let payload = header_len..header_len + len;
    apply_mask(&mut buf[payload.clone()], mask);
    Ok(Decoded::Frame {
        fin: header.is_final,
        opcode: op,
        payload,
        consumed: header_len + len,
    })
}

fn opcode_byte(op: OpCode) -> u8 {
    match op {
        OpCode::Data(Data::Continue) => opcode::CONTINUATION,
        OpCode::Data(Data::Text) => opcode::TEXT,
        OpCode::Data(Data::Binary) => opcode::BINARY,
        OpCode::Control(Control::Close) => opcode::CLOSE,
        OpCode::Control(Control::Ping) => opcode::PING,
        OpCode::Control(Control::Pong) => opcode::PONG,
        // FrameHeader::parse rejects reserved opcodes before we get here.
        OpCode::Data(Data::Reserved(b)) | OpCode::Control(Control::Reserved(b)) => b,
    }
}

/// What to do with a decoded data frame in the context of fragmentation.
pub enum Assembled {
    /// A complete unfragmented message whose payload is the frame's own range.
    Whole,
    /// A fragment was stored; the message is not complete yet.
    Stored,
    /// The fragmented message is complete in `RxState::fragments` (caller takes it).
    Complete(u8),
}

/// Fold a data frame (opcode TEXT, BINARY or CONTINUATION) into the fragmentation state.
pub fn assemble(
    rx: &mut Option<Box<RxState>>,
    fin: bool,
    op: u8,
    payload: &[u8],
    max_message: usize,
) -> Result<Assembled, WsError> {
    let in_progress = rx.as_ref().is_some_and(|r| r.frag_opcode != 0);
    match (op, in_progress) {
        (opcode::CONTINUATION, false) => Err(WsError::Protocol("continuation without a start")),
        (opcode::TEXT | opcode::BINARY, true) => {
            Err(WsError::Protocol("new message inside a fragmented one"))
        }
        (opcode::TEXT | opcode::BINARY, false) if fin => {
            if op == opcode::TEXT && std::str::from_utf8(payload).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(Assembled::Whole)
        }
        _ => {
            let state = rx.get_or_insert_with(Box::default);
            if state.frag_opcode == 0 {
                state.frag_opcode = op;
                state.utf8_checked = 0;
            }
            if state.fragments.len() + payload.len() > max_message {
                return Err(WsError::TooBig);
            }
            state.fragments.extend_from_slice(payload);
            if state.frag_opcode == opcode::TEXT {
                check_utf8_prefix(state, fin)?;
            }
            if fin {
                let op = state.frag_opcode;
                state.frag_opcode = 0;
                Ok(Assembled::Complete(op))
            } else {
                Ok(Assembled::Stored)
            }
        }
    }
}

/// Fail fast on invalid UTF-8 in a fragmented text message, tolerating a sequence cut at the end
/// of a non-final fragment.
fn check_utf8_prefix(state: &mut RxState, fin: bool) -> Result<(), WsError> {
    let from = state.utf8_checked as usize;
    match std::str::from_utf8(&state.fragments[from..]) {
        Ok(_) => {
            state.utf8_checked = state.fragments.len() as u32;
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !fin => {
            state.utf8_checked = (from + e.valid_up_to()) as u32;
            Ok(())
        }
        Err(_) => Err(WsError::InvalidUtf8),
    }
}

/// Fail fast on invalid UTF-8 in a text frame whose payload is still arriving.
///
/// `buf` starts at the frame's header and holds less than the whole frame. `in_text_message`
/// says a fragmented text message is in progress with no character cut at its end (a
/// continuation frame is then checked too). `from` is the payload prefix already validated by
/// the previous call; the new validated length is returned, so each byte is checked about
/// once. The bytes are unmasked in place for the check and masked again (XOR is its own
/// inverse), so `decode_frame` later sees them exactly as they arrived.
pub fn check_partial_text(
    buf: &mut [u8],
    in_text_message: bool,
    from: usize,
) -> Result<usize, WsError> {
    let mut cursor = Cursor::new(&*buf);
    let Ok(Some((header, len))) = FrameHeader::parse(&mut cursor) else {
        return Ok(from);
    };
    let start = cursor.position() as usize;
    let op = opcode_byte(header.opcode);
    let is_text = op == opcode::TEXT || (op == opcode::CONTINUATION && in_text_message);
    let Some(mask) = header.mask.filter(|_| is_text) else {
        return Ok(from);
    };
    let avail = (buf.len() - start).min(len.min(usize::MAX as u64) as usize);
    if avail <= from {
        return Ok(from);
    }
    let region = &mut buf[start + from..start + avail];
    let rotated = [
        mask[from % 4],
        mask[(from + 1) % 4],
        mask[(from + 2) % 4],
        mask[(from + 3) % 4],
    ];
    apply_mask(region, rotated);
    let verdict = match std::str::from_utf8(region) {
        Ok(_) => Ok(avail),
        Err(e) if e.error_len().is_none() => Ok(from + e.valid_up_to()),
        Err(_) => Err(WsError::InvalidUtf8),
    };
    apply_mask(region, rotated);
    verdict
}

/// Validate a close frame payload; returns the status code to echo.
pub fn parse_close(payload: &[u8]) -> Result<Option<u16>, WsError> {
    match payload.len() {
        0 => Ok(None),
        1 => Err(WsError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            if !CloseCode::from(code).is_allowed() || (1016..3000).contains(&code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(WsError::InvalidUtf8);
            }
            Ok(Some(code))
        }
    }
}

/// XOR `buf` with the 4-byte `mask` (RFC 6455 section 5.3), eight bytes at a time.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask) as u64;
    let m64 = m | (m << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        c.copy_from_slice(&(u64::from_ne_bytes(w) ^ m64).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the mask phase is 0 again.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// Longest server frame header (unmasked): 2 + 8 bytes.
pub const HEADER_BYTES_MAX: usize = 10;

/// Write an unmasked, final frame header for `len` payload bytes into `out`; returns its length.
#[inline]
pub fn write_header(out: &mut [u8; HEADER_BYTES_MAX], op: u8, len: usize) -> usize {
    out[0] = 0x80 | op;
    if len < 126 {
        out[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        out[1] = 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// A complete unmasked frame as bytes (control frames and replies; not the fan-out path).
pub fn frame_bytes(op: u8, payload: &[u8]) -> Vec<u8> {
    let mut head = [0u8; HEADER_BYTES_MAX];
    let n = write_header(&mut head, op, payload.len());
    let mut v = Vec::with_capacity(n + payload.len());
    v.extend_from_slice(&head[..n]);
    v.extend_from_slice(payload);
    v
}

/// A close frame with a status code and a reason (truncated to fit 125 bytes).
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = Vec::with_capacity(2 + reason.len().min(123));
    payload.extend_from_slice(&code.to_be_bytes());
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    frame_bytes(opcode::CLOSE, &payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(op: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let header = FrameHeader {
            is_final: fin,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::from(op),
            mask: Some(mask),
        };
        let mut out = Vec::new();
        header.format(payload.len() as u64, &mut out).unwrap();
        let mut body = payload.to_vec();
        apply_mask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn fast_mask_matches_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        for len in 0..40 {
            let orig: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(31)).collect();
            let mut fast = orig.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = orig
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn header_matches_tungstenite_format() {
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 1 << 20] {
            let mut ours = [0u8; HEADER_BYTES_MAX];
            let n = write_header(&mut ours, opcode::TEXT, len);
            let mut theirs = Vec::new();
            FrameHeader {
                is_final: true,
                rsv1: false,
                rsv2: false,
                rsv3: false,
                opcode: OpCode::Data(Data::Text),
                mask: None,
            }
            .format(len as u64, &mut theirs)
            .unwrap();
            assert_eq!(&ours[..n], &theirs[..], "len {len}");
        }
    }

    #[test]
    fn decodes_and_unmasks_in_place() {
        let mut buf = masked(opcode::TEXT, true, b"hello");
        buf.extend_from_slice(&masked(opcode::PING, true, b"p")[..3]); // partial next frame
        let Decoded::Frame {
            fin,
            opcode: op,
            payload,
            consumed,
        } = decode_frame(&mut buf, 1024).unwrap()
        else {
            panic!("expected a frame")
        };
        assert!(fin);
        assert_eq!(op, opcode::TEXT);
        assert_eq!(&buf[payload], b"hello");
        assert!(matches!(
            decode_frame(&mut buf[consumed..], 1024),
            Ok(Decoded::NeedMore)
        ));
    }

    #[test]
    fn rejects_unmasked_rsv_oversize_and_bad_control() {
        let mut unmasked = frame_bytes(opcode::TEXT, b"x");
        assert_eq!(
            decode_frame(&mut unmasked, 10).err(),
            Some(WsError::Protocol("client frames must be masked"))
        );
        let mut rsv = masked(opcode::TEXT, true, b"x");
        rsv[0] |= 0x40;
        assert!(matches!(
            decode_frame(&mut rsv, 10),
            Err(WsError::Protocol(_))
        ));
        let mut big = masked(opcode::TEXT, true, &[b'a'; 100]);
        assert_eq!(decode_frame(&mut big, 99).err(), Some(WsError::TooBig));
        // Too big is decided from the header alone.
        assert_eq!(decode_frame(&mut big[..6], 99).err(), Some(WsError::TooBig));
        let mut long_ping = masked(opcode::PING, true, &[0; 126]);
        assert!(matches!(
            decode_frame(&mut long_ping, 1000),
            Err(WsError::Protocol(_))
        ));
        let mut frag_ping = masked(opcode::PING, false, b"");
        assert!(matches!(
            decode_frame(&mut frag_ping, 1000),
            Err(WsError::Protocol(_))
        ));
        let mut reserved = masked(opcode::TEXT, true, b"");
        reserved[0] = 0x83;
        assert!(matches!(
            decode_frame(&mut reserved, 1000),
            Err(WsError::Protocol(_))
        ));
    }

    #[test]
    fn fragmentation_rules_and_utf8_fail_fast() {
        let mut rx = None;
        assert!(assemble(&mut rx, true, opcode::CONTINUATION, b"", 100).is_err());
        assert!(matches!(
            assemble(&mut rx, false, opcode::TEXT, "caf".as_bytes(), 100),
            Ok(Assembled::Stored)
        ));
        assert!(assemble(&mut rx, true, opcode::TEXT, b"x", 100).is_err());
        // 'é' split across fragments is fine.
        let e = "é".as_bytes();
        assert!(matches!(
            assemble(&mut rx, false, opcode::CONTINUATION, &e[..1], 100),
            Ok(Assembled::Stored)
        ));
        assert!(matches!(
            assemble(&mut rx, true, opcode::CONTINUATION, &e[1..], 100),
            Ok(Assembled::Complete(opcode::TEXT))
        ));
        assert_eq!(rx.as_ref().unwrap().fragments, "café".as_bytes());
        // Invalid UTF-8 fails on the fragment that makes it certain, not at the end.
        let mut rx = None;
        assert!(matches!(
            assemble(&mut rx, false, opcode::TEXT, &[0xce, 0xba, 0xff], 100),
            Err(WsError::InvalidUtf8)
        ));
        // Cumulative size limit.
        let mut rx = None;
        assert!(assemble(&mut rx, false, opcode::BINARY, &[0; 60], 100).is_ok());
        assert_eq!(
            assemble(&mut rx, true, opcode::CONTINUATION, &[0; 60], 100).err(),
            Some(WsError::TooBig)
        );
    }

    #[test]
    fn partial_text_frames_fail_fast_and_stay_masked() {
        // A valid text frame, arriving in pieces: each piece is checked once, bytes unchanged.
        let text = "héllo wörld, ünïcode".repeat(3);
        let whole = masked(opcode::TEXT, true, text.as_bytes());
        let mut checked = 0;
        for cut in [3, 9, 10, 30, whole.len() - 1] {
            let mut part = whole[..cut].to_vec();
            checked = check_partial_text(&mut part, false, checked).unwrap();
            assert_eq!(part, &whole[..cut], "bytes must be left masked");
            assert!(checked <= cut);
        }
        assert!(checked > 0);
        // Invalid bytes in the middle are refused before the frame is complete.
        let mut bad = b"valid start ".to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        bad.extend_from_slice(&[b'x'; 100]);
        let frame = masked(opcode::TEXT, true, &bad);
        let mut part = frame[..30].to_vec();
        assert_eq!(
            check_partial_text(&mut part, false, 0),
            Err(WsError::InvalidUtf8)
        );
        // Binary frames and continuations outside a text message are not checked.
        let mut bin = masked(opcode::BINARY, true, &bad)[..30].to_vec();
        assert_eq!(check_partial_text(&mut bin, false, 0), Ok(0));
        let mut cont = masked(opcode::CONTINUATION, true, &bad)[..30].to_vec();
        assert_eq!(check_partial_text(&mut cont, false, 0), Ok(0));
        let mut cont = masked(opcode::CONTINUATION, true, &bad)[..30].to_vec();
        assert_eq!(
            check_partial_text(&mut cont, true, 0),
            Err(WsError::InvalidUtf8)
        );
    }

    #[test]
    fn close_payload_validation() {
        assert_eq!(parse_close(b""), Ok(None));
        assert!(parse_close(&[3]).is_err());
        assert_eq!(parse_close(&1000u16.to_be_bytes()), Ok(Some(1000)));
        assert_eq!(parse_close(&4999u16.to_be_bytes()), Ok(Some(4999)));
        for bad in [0u16, 999, 1004, 1005, 1006, 1016, 1100, 2000, 2999, 5000] {
            assert!(parse_close(&bad.to_be_bytes()).is_err(), "{bad}");
        }
        let mut p = 1000u16.to_be_bytes().to_vec();
        p.push(0xff);
        assert_eq!(parse_close(&p), Err(WsError::InvalidUtf8));
        let f = close_frame(4008, &"é".repeat(100));
        assert!(f.len() <= 2 + 125);
        assert!(std::str::from_utf8(&f[4..]).is_ok());
    }
}
