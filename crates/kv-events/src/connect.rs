//! The PUB socket in vLLM's "connect" form (`tcp://host:port`, no wildcard), used when a
//! central indexer binds and every replica connects to it. libzmq connects lazily and
//! reconnects: a replica must start and serve while the indexer is not up yet, and keep
//! publishing after the indexer restarts. The pure-Rust `zeromq` crate fails a connect to a
//! closed port and never reconnects, so this side speaks the few parts of ZMTP 3.1 a
//! connecting PUB needs (NULL mechanism, the READY handshake, multipart frames) over a tokio
//! `TcpStream`, and reconnects on the next send after a connection is lost.
//!
//! As with any PUB socket, batches sent while no subscriber is connected are dropped (the
//! sequence numbers show the gap; the replay socket fills it).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;

/// Longest a connection attempt (TCP connect plus handshake) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between failed attempts, so a missing peer costs one attempt per interval, not one
/// per batch.
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// Why a connection attempt or a send failed (logged; never fatal).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
    #[error("the peer is not a ZMTP 3 socket")]
    NotZmtp,
}

struct Connection {
    writer: OwnedWriteHalf,
    /// Cleared by the reader task when the peer closes the connection.
    alive: Arc<AtomicBool>,
}

/// A PUB socket that connects to `addr` when it has something to send and reconnects after
/// the peer goes away.
pub struct LazyPub {
    addr: String,
    conn: Option<Connection>,
    next_attempt: Instant,
    /// Whether the last attempt failed (to log a lost peer once, not per retry).
    failing: bool,
}

impl LazyPub {
    /// Nothing is opened yet: the first send connects.
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            conn: None,
            next_attempt: Instant::now(),
            failing: false,
        }
    }

    /// Whether a peer is connected right now.
    pub fn is_connected(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.alive.load(Ordering::Acquire))
    }

    /// Send one multipart message, connecting first if needed. Returns whether it was written
    /// to a connected peer (false: dropped, as a PUB socket drops without subscribers).
    pub async fn send(&mut self, parts: &[Bytes]) -> bool {
        if !self.is_connected() {
            self.conn = None;
            if Instant::now() < self.next_attempt {
                return false;
            }
            match tokio::time::timeout(ATTEMPT_TIMEOUT, connect(&self.addr)).await {
                Ok(Ok(conn)) => {
                    tracing::info!(endpoint = %self.addr, "KV-event subscriber connected");
                    self.conn = Some(conn);
                    self.failing = false;
                }
                failed => {
                    if !self.failing {
                        let reason = match failed {
                            Ok(Err(e)) => e.to_string(),
                            _ => ConnectError::Timeout.to_string(),
                        };
                        tracing::warn!(endpoint = %self.addr, %reason, "KV-event subscriber not reachable; retrying while events are published");
                    }
                    self.failing = true;
                    self.next_attempt = Instant::now() + RETRY_INTERVAL;
                    return false;
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        let frame = encode_message(parts);
        if let Err(e) = conn.writer.write_all(&frame).await {
            tracing::warn!(endpoint = %self.addr, error = %e, "KV-event subscriber went away; reconnecting");
            self.conn = None;
            return false;
        }
        true
    }
}

/// TCP connect, then the ZMTP 3.1 greeting and READY handshake as a PUB (NULL mechanism); a
/// task keeps reading (and discarding) what the peer sends, and notes when it closes.
async fn connect(addr: &str) -> Result<Connection, ConnectError> {
    let addr = addr.strip_prefix("tcp://").unwrap_or(addr);
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut reader, mut writer) = stream.into_split();
    writer.write_all(&greeting()).await?;
    writer.write_all(&ready_command()).await?;
    let mut peer = [0u8; 64];
    reader.read_exact(&mut peer).await?;
    if peer[0] != 0xff || peer[9] != 0x7f || peer[10] < 3 {
        return Err(ConnectError::NotZmtp);
    }
    // The peer's READY (a command frame); its properties are not needed.
    let flags = reader.read_u8().await?;
    if flags & 0x04 == 0 {
        return Err(ConnectError::NotZmtp);
    }
    let size = if flags & 0x02 != 0 {
        reader.read_u64().await?
    } else {
        u64::from(reader.read_u8().await?)
    };
    let mut body = vec![0u8; size.min(1 << 16) as usize];
    reader.read_exact(&mut body).await?;
    let alive = Arc::new(AtomicBool::new(true));
    let flag = alive.clone();
    tokio::spawn(async move {
        // Subscriptions and anything else the peer sends: a SUB filters on receipt too, so
        // every batch goes out; reading keeps the peer's buffers from filling.
        let mut sink = vec![0u8; 4096];
        while let Ok(n) = reader.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        flag.store(false, Ordering::Release);
    });
    Ok(Connection { writer, alive })
}

/// ZMTP 3.1 greeting: signature, version 3.1, mechanism NULL, not a server.
fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[9] = 0x7f;
    g[10] = 3;
    g[11] = 1;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// The READY command announcing `Socket-Type: PUB`.
fn ready_command() -> Vec<u8> {
    let mut body = Vec::with_capacity(32);
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&3u32.to_be_bytes());
    body.extend_from_slice(b"PUB");
    let mut frame = vec![0x04, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// One multipart message as ZMTP frames: MORE on all parts but the last, long sizes past 255.
fn encode_message(parts: &[Bytes]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 9).sum());
    for (i, part) in parts.iter().enumerate() {
        let more = if i + 1 < parts.len() { 0x01 } else { 0x00 };
        if part.len() > 255 {
            out.push(more | 0x02);
            out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        } else {
            out.push(more);
            out.push(part.len() as u8);
        }
        out.extend_from_slice(part);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeromq::{Socket, SocketRecv};

    #[test]
    fn frames_follow_zmtp() {
        let g = greeting();
        assert_eq!((g[0], g[9], g[10], g[11]), (0xff, 0x7f, 3, 1));
        assert_eq!(&g[12..17], b"NULL\0");
        let r = ready_command();
        assert_eq!(r[0], 0x04);
        assert_eq!(r[1] as usize, r.len() - 2);
        let m = encode_message(&[Bytes::from_static(b"t"), Bytes::from(vec![7u8; 300])]);
        assert_eq!(&m[..3], &[0x01, 1, b't']);
        assert_eq!(m[3], 0x02);
        assert_eq!(u64::from_be_bytes(m[4..12].try_into().unwrap()), 300);
        assert_eq!(m.len(), 3 + 9 + 300);
    }

    /// A subscriber that binds after the publisher started, then restarts on the same port:
    /// the publisher keeps running, connects when it can and reconnects after the restart.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connects_late_and_reconnects_after_a_restart() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let addr = format!("tcp://127.0.0.1:{port}");
        let mut publisher = LazyPub::new(addr.clone());
        let msg = |n: u8| vec![Bytes::from_static(b"kv"), Bytes::from(vec![n])];
        // Nobody listens: dropped, no error, no wait.
        assert!(!publisher.send(&msg(0)).await);
        for round in 1..=2u8 {
            let mut sub = zeromq::SubSocket::new();
            sub.bind(&addr).await.expect("bind");
            sub.subscribe("kv").await.expect("subscribe");
            let deadline = Instant::now() + Duration::from_secs(20);
            let got = loop {
                publisher.send(&msg(round)).await;
                if let Ok(Ok(m)) =
                    tokio::time::timeout(Duration::from_millis(200), sub.recv()).await
                {
                    break m;
                }
                assert!(Instant::now() < deadline, "round {round}: nothing received");
            };
            assert_eq!(got.get(0).map(|b| b.to_vec()), Some(b"kv".to_vec()));
            assert_eq!(got.get(1).map(|b| b.to_vec()), Some(vec![round]));
            drop(sub);
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}
