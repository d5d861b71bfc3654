//! Minimal client side of RFC 6455, sans-IO: the upgrade request, the 101 check, masked frame
//! encoding and parsing of (unmasked) server frames including fragmented messages.
//!
//! Owns bytes only: no sockets, no clocks. The load generator keeps per-connection state tiny
//! (a partial-frame tail and a fragment buffer), so everything here works on borrowed slices.
//! It must not allocate per frame on the hot path except when a message is fragmented.

/// Largest server payload we accept in one frame or one reassembled message; bigger ones are a
/// protocol error for the generator (the server's frames are a few hundred bytes).
pub const MESSAGE_BYTES_MAX: usize = 1 << 20;

/// Largest HTTP response head we wait for before calling the upgrade failed.
pub const HTTP_HEAD_BYTES_MAX: usize = 8192;

/// WebSocket opcodes used by the generator.
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// Standard base64 (with padding) of `input`; used for `Sec-WebSocket-Key`.
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(TABLE[(n >> 18) as usize & 63] as char);
        out.push(TABLE[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            TABLE[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            TABLE[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The HTTP/1.1 upgrade request for `path_and_query` on `host`.
pub fn upgrade_request(host: &str, path_and_query: &str, key_bytes: [u8; 16]) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        base64(&key_bytes)
    )
    .into_bytes()
}

/// Outcome of looking at the bytes received so far in answer to the upgrade request.
#[derive(Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The head is not complete yet: read more.
    Incomplete,
    /// 101 received; the head took this many bytes (frames may follow in the same read).
    Done(usize),
    /// Anything else: the status line (or a reason) to report; drop the connection.
    Refused(String),
}

/// Checks the server's answer to the upgrade request.
pub fn parse_upgrade(buf: &[u8]) -> Upgrade {
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        if buf.len() > HTTP_HEAD_BYTES_MAX {
            return Upgrade::Refused("HTTP response head too large".into());
        }
        return Upgrade::Incomplete;
    };
    let head = &buf[..end];
    let status_line = head.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let status = String::from_utf8_lossy(status_line).into_owned();
    if !status.starts_with("HTTP/1.1 101") {
        return Upgrade::Refused(status);
    }
    let lower = head.to_ascii_lowercase();
    if memchr::memmem::find(&lower, b"upgrade: websocket").is_none() {
        return Upgrade::Refused("101 without 'Upgrade: websocket'".into());
    }
    Upgrade::Done(end + 4)
}

/// Appends one masked client frame (FIN set) with `payload` to `out`.
pub fn encode_frame(out: &mut Vec<u8>, op: u8, payload: &[u8], mask: [u8; 4]) {
    out.push(0x80 | (op & 0x0f));
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// A close frame with `code` (masked).
pub fn encode_close(out: &mut Vec<u8>, code: u16, mask: [u8; 4]) {
    encode_frame(out, opcode::CLOSE, &code.to_be_bytes(), mask);
}

/// One parsed server frame, borrowing its payload from the input.
#[derive(Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub op: u8,
    pub payload: &'a [u8],
}

/// Why the server's byte stream is not acceptable; the connection is dropped and counted.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// Server frames must not be masked (RFC 6455 5.1).
    Masked,
    /// RSV bits set without a negotiated extension.
    Reserved,
    /// Payload over [`MESSAGE_BYTES_MAX`].
    TooLarge,
    /// Opcode 3-7 or 0xB-0xF.
    BadOpcode(u8),
    /// Control frame fragmented or longer than 125 bytes.
    BadControl,
    /// Continuation without a started message, or a new message inside a fragmented one.
    BadFragment,
}

/// Parses one frame at the start of `buf`: `Ok(None)` when more bytes are needed, otherwise
/// the frame and the number of bytes it took.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 != 0 {
        return Err(FrameError::Masked);
    }
    let op = b0 & 0x0f;
    let fin = b0 & 0x80 != 0;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7f) > 125 {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::BadOpcode(other)),
    }
    let (len, head) = match b1 & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let n = u64::from_be_bytes(b);
            if n > MESSAGE_BYTES_MAX as u64 {
                return Err(FrameError::TooLarge);
            }
            (n as usize, 10)
        }
        n => (usize::from(n), 2),
    };
    if len > MESSAGE_BYTES_MAX {
        return Err(FrameError::TooLarge);
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            fin,
            op,
            payload: &buf[head..head + len],
        },
        head + len,
    )))
}

/// Reassembly state for fragmented data messages of one connection.
#[derive(Debug, Default)]
pub struct Reassembly {
    /// Payload of the message being reassembled; empty when none is in progress.
    buf: Vec<u8>,
    /// Opcode of the message in progress, `None` when none.
    op: Option<u8>,
}

/// A complete message or control frame, ready for the scenario.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Text(&'a [u8]),
    Binary(&'a [u8]),
    Ping(&'a [u8]),
    Pong,
    /// Close with its code (1005 when the frame had none).
    Close(u16),
}

impl Reassembly {
    /// Feeds one frame; returns a complete message when there is one. The returned slice
    /// borrows either the frame or this buffer, valid until the next call.
    pub fn push<'a>(&'a mut self, frame: Frame<'a>) -> Result<Option<Message<'a>>, FrameError> {
        match frame.op {
            opcode::PING => Ok(Some(Message::Ping(frame.payload))),
            opcode::PONG => Ok(Some(Message::Pong)),
            opcode::CLOSE => {
                let code = if frame.payload.len() >= 2 {
                    u16::from_be_bytes([frame.payload[0], frame.payload[1]])
                } else {
                    1005
                };
                Ok(Some(Message::Close(code)))
            }
            opcode::CONTINUATION => {
                let Some(op) = self.op else {
                    return Err(FrameError::BadFragment);
                };
                if self.buf.len() + frame.payload.len() > MESSAGE_BYTES_MAX {
                    return Err(FrameError::TooLarge);
                }
                self.buf.extend_from_slice(frame.payload);
                if !frame.fin {
                    return Ok(None);
                }
                self.op = None;
                let done: &'a [u8] = &self.buf;
                Ok(Some(if op == opcode::TEXT {
                    Message::Text(done)
                } else {
                    Message::Binary(done)
                }))
            }
            op => {
                if self.op.is_some() {
                    return Err(FrameError::BadFragment);
                }
                if frame.fin {
                    return Ok(Some(if op == opcode::TEXT {
                        Message::Text(frame.payload)
                    } else {
                        Message::Binary(frame.payload)
                    }));
                }
                self.buf.clear();
                self.buf.extend_from_slice(frame.payload);
                self.op = Some(op);
                Ok(None)
            }
        }
    }

    /// Frees the reassembly buffer once a fragmented message has been consumed.
    pub fn shrink(&mut self) {
        if self.op.is_none() && self.buf.capacity() > 0 {
            self.buf = Vec::new();
        }
    }
}

/// Finds the unsigned integer after `key` (e.g. `"seq":`) in a JSON text, without parsing it.
pub fn find_u64(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let rest = &text[at..];
    let start = rest.iter().position(|b| *b != b' ')?;
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in &rest[start..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// Finds the number that starts a string value: `key` then optional spaces then `"` + `prefix`
/// then digits (e.g. the scheduled time in a clientMsgId `"x<ts>-<seq>-<nonce>"`).
pub fn find_str_u64(text: &[u8], key: &[u8], prefix: &[u8]) -> Option<u64> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let rest = &text[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = rest[start..].strip_prefix(b"\"")?.strip_prefix(prefix)?;
    let mut n: u64 = 0;
    let mut digits = 0;
    for &b in rest {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(n)
}

/// The string value after `key` (e.g. `"epoch":`), without its quotes; `None` when the value
/// is not a string or holds an escape (the server's epochs and ids never do).
pub fn find_str<'a>(text: &'a [u8], key: &[u8]) -> Option<&'a [u8]> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let rest = &text[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = rest[start..].strip_prefix(b"\"")?;
    let end = memchr::memchr2(b'"', b'\\', rest)?;
    (rest[end] == b'"').then_some(&rest[..end])
}

/// The boolean after `key` (e.g. `"recovered":`); `None` when absent or not a boolean.
pub fn find_bool(text: &[u8], key: &[u8]) -> Option<bool> {
    let at = memchr::memmem::find(text, key)? + key.len();
    let rest = &text[at..];
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &rest[start..];
    if rest.starts_with(b"true") {
        Some(true)
    } else if rest.starts_with(b"false") {
        Some(false)
    } else {
        None
    }
}

/// True when the first `"type":` key of `text` has the string value `ty` (whitespace after the
/// colon allowed). Server frames put `type` first, so user data cannot shadow it.
pub fn has_type(text: &[u8], ty: &[u8]) -> bool {
    let Some(at) = memchr::memmem::find(text, b"\"type\":") else {
        return false;
    };
    let rest = &text[at + 7..];
    let Some(start) = rest.iter().position(|b| !b.is_ascii_whitespace()) else {
        return false;
    };
    let rest = &rest[start..];
    rest.len() > ty.len() + 1
        && rest[0] == b'"'
        && &rest[1..=ty.len()] == ty
        && rest[ty.len() + 1] == b'"'
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server_frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![(if fin { 0x80 } else { 0 }) | op];
        if payload.len() < 126 {
            v.push(payload.len() as u8);
        } else if payload.len() < 65536 {
            v.push(126);
            v.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        } else {
            v.push(127);
            v.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        }
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0u8; 16]), "AAAAAAAAAAAAAAAAAAAAAA==");
    }

    #[test]
    fn upgrade_accepts_101_and_reports_head_length() {
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x02hi";
        match parse_upgrade(resp) {
            Upgrade::Done(n) => assert_eq!(&resp[n..], b"\x81\x02hi"),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(parse_upgrade(b"HTTP/1.1 101 Sw"), Upgrade::Incomplete);
        assert_eq!(
            parse_upgrade(b"HTTP/1.1 503 Service Unavailable\r\n\r\n"),
            Upgrade::Refused("HTTP/1.1 503 Service Unavailable".into())
        );
        assert!(matches!(
            parse_upgrade(b"HTTP/1.1 101 OK\r\nConnection: Upgrade\r\n\r\n"),
            Upgrade::Refused(_)
        ));
    }

    #[test]
    fn masked_frame_unmasks_to_payload_for_all_length_forms() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut out = Vec::new();
            let mask = [1, 2, 3, 0xff];
            encode_frame(&mut out, opcode::TEXT, &payload, mask);
            assert_eq!(out[0], 0x81);
            assert!(out[1] & 0x80 != 0, "client frames must be masked");
            let (plen, head) = match out[1] & 0x7f {
                126 => (usize::from(u16::from_be_bytes([out[2], out[3]])), 4),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&out[2..10]);
                    (u64::from_be_bytes(b) as usize, 10)
                }
                n => (usize::from(n), 2),
            };
            assert_eq!(plen, len);
            let key = &out[head..head + 4];
            let un: Vec<u8> = out[head + 4..]
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ key[i & 3])
                .collect();
            assert_eq!(un, payload);
        }
    }

    #[test]
    fn parse_frame_needs_whole_frame_and_handles_extended_lengths() {
        for len in [3usize, 125, 126, 1000, 65536] {
            let payload = vec![b'x'; len];
            let f = server_frame(true, opcode::TEXT, &payload);
            for cut in [1, 2, 3, f.len() - 1] {
                assert_eq!(parse_frame(&f[..cut]), Ok(None), "len {len} cut {cut}");
            }
            let (frame, used) = parse_frame(&f).expect("valid").expect("complete");
            assert_eq!(used, f.len());
            assert_eq!(frame.payload.len(), len);
            assert!(frame.fin);
        }
    }

    #[test]
    fn parse_frame_rejects_protocol_errors() {
        assert_eq!(
            parse_frame(&[0x81, 0x81, 0, 0, 0, 0, 0]),
            Err(FrameError::Masked)
        );
        assert_eq!(parse_frame(&[0xC1, 0x00]), Err(FrameError::Reserved));
        assert_eq!(parse_frame(&[0x83, 0x00]), Err(FrameError::BadOpcode(3)));
        assert_eq!(parse_frame(&[0x09, 0x00]), Err(FrameError::BadControl));
        assert_eq!(
            parse_frame(&[0x89, 126, 0, 200]),
            Err(FrameError::BadControl)
        );
        let mut huge = vec![0x81, 127];
        huge.extend_from_slice(&(u64::MAX).to_be_bytes());
        assert_eq!(parse_frame(&huge), Err(FrameError::TooLarge));
    }

    #[test]
    fn fragmented_text_with_interleaved_ping_reassembles() {
        let mut wire = server_frame(false, opcode::TEXT, b"{\"seq\":");
        wire.extend(server_frame(true, opcode::PING, b"p"));
        wire.extend(server_frame(false, opcode::CONTINUATION, b"42,"));
        wire.extend(server_frame(true, opcode::CONTINUATION, b"\"ts\":7}"));
        let mut r = Reassembly::default();
        let mut got = Vec::new();
        let mut at = 0;
        while let Some((frame, used)) = parse_frame(&wire[at..]).expect("valid") {
            at += used;
            match r.push(frame).expect("valid") {
                Some(Message::Text(t)) => got.push(String::from_utf8_lossy(t).into_owned()),
                Some(Message::Ping(p)) => got.push(format!("ping:{}", p.len())),
                Some(other) => panic!("unexpected {other:?}"),
                None => {}
            }
        }
        assert_eq!(at, wire.len());
        assert_eq!(
            got,
            vec!["ping:1".to_string(), "{\"seq\":42,\"ts\":7}".into()]
        );
    }

    #[test]
    fn continuation_without_start_and_nested_start_are_errors() {
        let mut r = Reassembly::default();
        let f = Frame {
            fin: true,
            op: opcode::CONTINUATION,
            payload: b"x",
        };
        assert_eq!(r.push(f), Err(FrameError::BadFragment));
        let mut r = Reassembly::default();
        let start = Frame {
            fin: false,
            op: opcode::TEXT,
            payload: b"a",
        };
        assert_eq!(r.push(start), Ok(None));
        let again = Frame {
            fin: true,
            op: opcode::TEXT,
            payload: b"b",
        };
        assert_eq!(r.push(again), Err(FrameError::BadFragment));
    }

    #[test]
    fn close_code_is_extracted() {
        let mut r = Reassembly::default();
        let f = Frame {
            fin: true,
            op: opcode::CLOSE,
            payload: &[0x0f, 0xa8, b'x'],
        };
        assert_eq!(r.push(f), Ok(Some(Message::Close(4008))));
        let f = Frame {
            fin: true,
            op: opcode::CLOSE,
            payload: &[],
        };
        assert_eq!(r.push(f), Ok(Some(Message::Close(1005))));
    }

    #[test]
    fn has_type_matches_whole_first_type_value() {
        let t = br#"{"type":"message.ack","data":{"type":"x"}}"#;
        assert!(has_type(t, b"message.ack"));
        assert!(!has_type(t, b"message"));
        assert!(!has_type(t, b"x"));
        assert!(has_type(br#"{"type": "pong"}"#, b"pong"));
        assert!(!has_type(br#"{"type":"pon"#, b"pong"));
        assert!(!has_type(b"{}", b"pong"));
    }

    #[test]
    fn find_str_and_find_bool_read_values_after_keys() {
        let t = br#"{"type":"subscribed","room":"r","data":{"offset":7,"epoch": "9f3a","recovered":true},"timestamp":5}"#;
        assert_eq!(find_str(t, b"\"epoch\":"), Some(&b"9f3a"[..]));
        assert_eq!(find_str(t, b"\"room\":"), Some(&b"r"[..]));
        assert_eq!(find_str(t, b"\"offset\":"), None);
        assert_eq!(find_str(br#"{"epoch":"a\"b"}"#, b"\"epoch\":"), None);
        assert_eq!(find_str(br#"{"epoch":"abc"#, b"\"epoch\":"), None);
        assert_eq!(find_str(b"{}", b"\"epoch\":"), None);
        assert_eq!(find_bool(t, b"\"recovered\":"), Some(true));
        assert_eq!(
            find_bool(br#"{"recovered": false}"#, b"\"recovered\":"),
            Some(false)
        );
        assert_eq!(find_bool(br#"{"recovered":1}"#, b"\"recovered\":"), None);
        assert_eq!(find_bool(b"{}", b"\"recovered\":"), None);
    }

    #[test]
    fn find_u64_reads_numbers_after_keys() {
        let t = br#"{"type":"message","room":"r","data":{"seq":123,"ts":98765,"pad":"xx"},"timestamp":5}"#;
        assert_eq!(find_u64(t, b"\"seq\":"), Some(123));
        assert_eq!(find_u64(t, b"\"ts\":"), Some(98765));
        assert_eq!(find_u64(t, b"\"timestamp\":"), Some(5));
        assert_eq!(find_u64(b"{\"ts\": 12}", b"\"ts\":"), Some(12));
        assert_eq!(find_u64(b"{\"ts\":\"x\"}", b"\"ts\":"), None);
        assert_eq!(
            find_u64(b"{\"ts\":99999999999999999999999}", b"\"ts\":"),
            None
        );
        assert_eq!(find_u64(b"{}", b"\"ts\":"), None);
        let k = b"\"clientMsgId\":";
        assert_eq!(
            find_str_u64(br#"{"clientMsgId": "x12-3-4"}"#, k, b"x"),
            Some(12)
        );
        assert_eq!(find_str_u64(br#"{"clientMsgId":"y12"}"#, k, b"x"), None);
    }
}
