//! Self-test of the TCP fault proxy (`tests/common/proxy.rs`) over a plain echo server.
#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use common::proxy::Proxy;

/// An echo server on a free loopback port, one thread per connection; its address.
fn echo_server() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("echo addr").to_string();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut c = c;
                let mut buf = [0u8; 1024];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn client(addr: &str) -> TcpStream {
    let c = TcpStream::connect(addr).expect("connect through the proxy");
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .expect("read timeout");
    c
}

/// Some(reply) to `msg`, or None when nothing came back within the read timeout; Err when the
/// connection is closed.
fn ask(c: &mut TcpStream, msg: &[u8]) -> Result<Option<Vec<u8>>, ()> {
    if c.write_all(msg).is_err() {
        return Err(());
    }
    let mut buf = vec![0u8; msg.len()];
    let mut got = 0;
    while got < buf.len() {
        match c.read(&mut buf[got..]) {
            Ok(0) => return Err(()),
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Ok(None)
            }
            Err(_) => return Err(()),
        }
    }
    Ok(Some(buf))
}

#[test]
fn forwards_swallows_cuts_heals() {
    let p = Proxy::start(&echo_server());
    let mut c = client(&p.addr());
    assert_eq!(ask(&mut c, b"hello"), Ok(Some(b"hello".to_vec())));
    assert_eq!(p.connections(), 1);

    p.swallow();
    assert_eq!(ask(&mut c, b"lost"), Ok(None), "swallowed bytes came back");
    let mut held = client(&p.addr());
    assert_eq!(
        ask(&mut held, b"held"),
        Ok(None),
        "a new connection was forwarded"
    );

    p.heal();
    assert_eq!(
        ask(&mut c, b"x"),
        Err(()),
        "heal keeps a swallowed connection"
    );
    let mut c = client(&p.addr());
    assert_eq!(ask(&mut c, b"again"), Ok(Some(b"again".to_vec())));

    p.cut();
    assert_eq!(ask(&mut c, b"x"), Err(()), "a cut connection stayed open");
    assert!(
        TcpStream::connect(p.addr()).is_err(),
        "a cut proxy accepted"
    );
    assert_eq!(p.connections(), 0);

    p.heal();
    let mut c = client(&p.addr());
    assert_eq!(ask(&mut c, b"back"), Ok(Some(b"back".to_vec())));
}
