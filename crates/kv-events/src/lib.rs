//! KV-cache events on the wire, as vLLM publishes them (`--kv-events-config`): a ZMQ PUB socket
//! sends `(topic, sequence number as 8 big-endian bytes, msgpack payload)` per engine step with
//! events, the payload being vLLM's `KVEventBatch` as msgspec encodes it:
//!
//! ```text
//! {"ts": 1764450000.5, "events": [
//!    {"type": "BlockStored", "block_hashes": [<32 bytes>, ...], "parent_block_hash": <32 bytes>|nil,
//!     "token_ids": [...], "block_size": 16, "lora_id": nil, "medium": "GPU", "lora_name": nil},
//!    {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"},
//!    {"type": "AllBlocksCleared"}],
//!  "data_parallel_rank": 0}
//! ```
//!
//! (msgspec structs with `tag=True` and `omit_defaults=True`: the tag first, fields in their
//! declared order, optional fields left at their default omitted.) `medium` is vLLM's name of
//! the primary KV-cache tier, `"GPU"`, whatever the device. An optional ROUTER socket answers a
//! replay request `(empty frame, start sequence as 8 big-endian bytes)` with every buffered
//! batch from that number on, `(empty, seq, payload)` each, then `(empty, -1, empty)`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use serde::Deserialize;
use spindle_engine::kv_events::{KvCacheEvent, KvEventBatch, KvEventSink};
use zeromq::{Socket, SocketRecv, SocketSend, ZmqMessage};

pub mod connect;
use connect::LazyPub;

/// vLLM's name for the primary KV-cache tier.
pub const MEDIUM: &str = "GPU";

/// Why events cannot be published.
#[derive(Debug, thiserror::Error)]
pub enum KvEventsError {
    #[error("invalid --kv-events-config: {0}")]
    Config(String),
    #[error("cannot open {endpoint}: {reason}")]
    Socket { endpoint: String, reason: String },
    #[error("the KV-event publisher thread failed to start: {0}")]
    Thread(String),
}

/// vLLM's `KVEventsConfig` (the JSON of `--kv-events-config`); unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct KvEventsConfig {
    pub enable_kv_cache_events: bool,
    /// `zmq` or `null` (events off).
    pub publisher: String,
    /// PUB address: `tcp://*:5557` binds; an address without a wildcard connects.
    pub endpoint: String,
    /// ROUTER address for replay requests (bound).
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Messages a slow subscriber may have queued.
    pub hwm: usize,
    /// Batches waiting for the publisher thread; more are dropped (and counted).
    pub max_queue_size: usize,
    pub topic: String,
}

impl Default for KvEventsConfig {
    fn default() -> Self {
        Self {
            enable_kv_cache_events: false,
            publisher: "null".into(),
            endpoint: "tcp://*:5557".into(),
            replay_endpoint: None,
            buffer_steps: 10_000,
            hwm: 100_000,
            max_queue_size: 100_000,
            topic: String::new(),
        }
    }
}

impl KvEventsConfig {
    /// Parse the flag's JSON; `None` when events are off.
    pub fn parse(json: &str) -> Result<Option<Self>, KvEventsError> {
        let cfg: Self =
            serde_json::from_str(json).map_err(|e| KvEventsError::Config(e.to_string()))?;
        if !cfg.enable_kv_cache_events || cfg.publisher == "null" {
            return Ok(None);
        }
        if cfg.publisher != "zmq" {
            return Err(KvEventsError::Config(format!(
                "publisher `{}` is not supported (use \"zmq\" or \"null\")",
                cfg.publisher
            )));
        }
        if cfg.buffer_steps == 0 || cfg.max_queue_size == 0 {
            return Err(KvEventsError::Config(
                "buffer_steps and max_queue_size must be positive".into(),
            ));
        }
        Ok(Some(cfg))
    }
}

/// vLLM binds when the address has a wildcard and connects otherwise.
fn socket_address(endpoint: &str) -> (String, bool) {
    let bind = endpoint.contains('*') || endpoint.contains("::");
    (endpoint.replace("tcp://*:", "tcp://0.0.0.0:"), bind)
}

/// msgpack of one event batch as vLLM's consumers decode it: the batch an array
/// `[ts, [events...], data_parallel_rank]` (msgspec `array_like`), each event a map tagged with
/// its class name under `"type"` and then its fields in declared order (msgspec `tag=True`).
pub fn encode_batch(batch: &KvEventBatch, data_parallel_rank: u32) -> Vec<u8> {
    use rmp::encode::*;
    let mut b = Vec::with_capacity(64 + batch.events.len() * 128);
    // Writes into a Vec cannot fail.
    let _ = write_array_len(&mut b, 3);
    let _ = write_f64(&mut b, batch.ts);
    let _ = write_array_len(&mut b, batch.events.len() as u32);
    for event in &batch.events {
        match event {
            KvCacheEvent::BlockStored {
                block_hashes,
                parent_block_hash,
                token_ids,
                block_size,
            } => {
                let _ = write_map_len(&mut b, 8);
                let _ = write_str(&mut b, "type");
                let _ = write_str(&mut b, "BlockStored");
                let _ = write_str(&mut b, "block_hashes");
                let _ = write_array_len(&mut b, block_hashes.len() as u32);
                for h in block_hashes {
                    let _ = write_bin(&mut b, h);
                }
                let _ = write_str(&mut b, "parent_block_hash");
                match parent_block_hash {
                    Some(h) => {
                        let _ = write_bin(&mut b, h);
                    }
                    None => {
                        let _ = write_nil(&mut b);
                    }
                }
                let _ = write_str(&mut b, "token_ids");
                let _ = write_array_len(&mut b, token_ids.len() as u32);
                for &t in token_ids {
                    let _ = write_uint(&mut b, u64::from(t));
                }
                let _ = write_str(&mut b, "block_size");
                let _ = write_uint(&mut b, *block_size as u64);
                let _ = write_str(&mut b, "lora_id");
                let _ = write_nil(&mut b);
                let _ = write_str(&mut b, "medium");
                let _ = write_str(&mut b, MEDIUM);
                let _ = write_str(&mut b, "lora_name");
                let _ = write_nil(&mut b);
            }
            KvCacheEvent::BlockRemoved { block_hashes } => {
                let _ = write_map_len(&mut b, 3);
                let _ = write_str(&mut b, "type");
                let _ = write_str(&mut b, "BlockRemoved");
                let _ = write_str(&mut b, "block_hashes");
                let _ = write_array_len(&mut b, block_hashes.len() as u32);
                for h in block_hashes {
                    let _ = write_bin(&mut b, h);
                }
                let _ = write_str(&mut b, "medium");
                let _ = write_str(&mut b, MEDIUM);
            }
            KvCacheEvent::AllBlocksCleared => {
                let _ = write_map_len(&mut b, 1);
                let _ = write_str(&mut b, "type");
                let _ = write_str(&mut b, "AllBlocksCleared");
            }
        }
    }
    let _ = write_uint(&mut b, u64::from(data_parallel_rank));
    b
}

/// The engine's [`KvEventSink`] for `--kv-events-config`: a bounded queue to a publisher thread.
pub struct ZmqPublisher {
    queue: tokio::sync::mpsc::Sender<KvEventBatch>,
    dropped: AtomicU64,
    _thread: JoinHandle<()>,
}

impl std::fmt::Debug for ZmqPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqPublisher")
            .field("dropped", &self.dropped)
            .finish()
    }
}

impl ZmqPublisher {
    /// Open the sockets (errors surface here, at start-up) and start the publisher thread.
    pub fn start(cfg: KvEventsConfig) -> Result<Arc<Self>, KvEventsError> {
        let (queue, batches) = tokio::sync::mpsc::channel(cfg.max_queue_size);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("spindle-kv-events".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(KvEventsError::Thread(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(publish_loop(cfg, batches, ready_tx));
            })
            .map_err(|e| KvEventsError::Thread(e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Arc::new(Self {
                queue,
                dropped: AtomicU64::new(0),
                _thread: thread,
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KvEventsError::Thread("exited before it was ready".into())),
        }
    }

    /// Batches dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl KvEventSink for ZmqPublisher {
    fn publish(&self, batch: KvEventBatch) {
        if self.queue.try_send(batch).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "KV-event queue full; batches dropped (consumers will see a gap in sequence numbers)");
            }
        }
    }
}

type Ready = std::sync::mpsc::Sender<Result<(), KvEventsError>>;

/// The PUB side: bound (`tcp://*:port`, errors at start-up) or connecting lazily
/// (`tcp://host:port`, vLLM's connect form: never blocks start-up, reconnects).
enum Publisher {
    Bound(zeromq::PubSocket),
    Connecting(LazyPub),
}

impl Publisher {
    async fn send(&mut self, parts: Vec<Bytes>) {
        match self {
            Publisher::Bound(socket) => {
                let mut parts = parts.into_iter();
                let mut message = ZmqMessage::from(parts.next().unwrap_or_default());
                for p in parts {
                    message.push_back(p);
                }
                if let Err(e) = socket.send(message).await {
                    tracing::warn!(error = %e, "publishing a KV-event batch failed");
                }
            }
            Publisher::Connecting(lazy) => {
                lazy.send(&parts).await;
            }
        }
    }
}

async fn open_pub(cfg: &KvEventsConfig) -> Result<Publisher, KvEventsError> {
    let (addr, bind) = socket_address(&cfg.endpoint);
    if !bind {
        return Ok(Publisher::Connecting(LazyPub::new(addr)));
    }
    let mut socket = zeromq::PubSocket::new();
    socket
        .bind(&addr)
        .await
        .map_err(|e| KvEventsError::Socket {
            endpoint: cfg.endpoint.clone(),
            reason: e.to_string(),
        })?;
    Ok(Publisher::Bound(socket))
}

async fn open_replay(endpoint: &str) -> Result<zeromq::RouterSocket, KvEventsError> {
    let mut socket = zeromq::RouterSocket::new();
    let (addr, _) = socket_address(endpoint);
    socket
        .bind(&addr)
        .await
        .map_err(|e| KvEventsError::Socket {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        })?;
    Ok(socket)
}

async fn publish_loop(
    cfg: KvEventsConfig,
    mut batches: tokio::sync::mpsc::Receiver<KvEventBatch>,
    ready: Ready,
) {
    let mut publisher = match open_pub(&cfg).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut replay = match &cfg.replay_endpoint {
        Some(endpoint) => match open_replay(endpoint).await {
            Ok(s) => Some(s),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        },
        None => None,
    };
    let _ = ready.send(Ok(()));
    tracing::info!(endpoint = %cfg.endpoint, replay = ?cfg.replay_endpoint, topic = %cfg.topic, "publishing KV-cache events");
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut buffer: VecDeque<(u64, Bytes)> = VecDeque::with_capacity(cfg.buffer_steps.min(1024));
    let mut seq: u64 = 0;
    loop {
        tokio::select! {
            batch = batches.recv() => {
                let Some(batch) = batch else { break };
                let payload = Bytes::from(encode_batch(&batch, 0));
                publisher
                    .send(vec![
                        topic.clone(),
                        Bytes::copy_from_slice(&seq.to_be_bytes()),
                        payload.clone(),
                    ])
                    .await;
                if buffer.len() == cfg.buffer_steps {
                    buffer.pop_front();
                }
                buffer.push_back((seq, payload));
                seq += 1;
            }
            request = async {
                match replay.as_mut() {
                    Some(r) => r.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                let Ok(request) = request else { continue };
                if let Some(r) = replay.as_mut() {
                    serve_replay(r, request, &buffer).await;
                }
            }
        }
    }
}

/// Answer `(identity, empty, start_seq)` with the buffered batches from `start_seq` on, then the
/// end marker `-1`.
async fn serve_replay(
    socket: &mut zeromq::RouterSocket,
    request: ZmqMessage,
    buffer: &VecDeque<(u64, Bytes)>,
) {
    let frames: Vec<Bytes> = request.into_vec();
    let [identity, _empty, start] = frames.as_slice() else {
        tracing::warn!(frames = frames.len(), "malformed KV-event replay request");
        return;
    };
    let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
        tracing::warn!("KV-event replay request without an 8-byte sequence number");
        return;
    };
    let start = u64::from_be_bytes(start);
    let reply = |seq: Bytes, payload: Bytes| {
        let mut m = ZmqMessage::from(identity.clone());
        m.push_back(Bytes::new());
        m.push_back(seq);
        m.push_back(payload);
        m
    };
    for (seq, payload) in buffer.iter().filter(|(s, _)| *s >= start) {
        let m = reply(Bytes::copy_from_slice(&seq.to_be_bytes()), payload.clone());
        if socket.send(m).await.is_err() {
            return;
        }
    }
    let _ = socket
        .send(reply(
            Bytes::copy_from_slice(&(-1i64).to_be_bytes()),
            Bytes::new(),
        ))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_follows_vllm() {
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events": false, "publisher": "zmq"}"#)
                .unwrap(),
            None
        );
        assert_eq!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events": true}"#).unwrap(),
            None,
            "publisher null by default"
        );
        let cfg = KvEventsConfig::parse(
            r#"{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "tcp://*:6000", "topic": "kv", "unknown_field": 1}"#,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (cfg.endpoint.as_str(), cfg.topic.as_str(), cfg.buffer_steps),
            ("tcp://*:6000", "kv", 10_000)
        );
        assert!(
            KvEventsConfig::parse(r#"{"enable_kv_cache_events": true, "publisher": "kafka"}"#)
                .is_err()
        );
        assert!(KvEventsConfig::parse("not json").is_err());
        assert_eq!(
            socket_address("tcp://*:5557"),
            ("tcp://0.0.0.0:5557".into(), true)
        );
        assert_eq!(
            socket_address("tcp://10.0.0.1:5557"),
            ("tcp://10.0.0.1:5557".into(), false)
        );
    }

    #[test]
    fn batches_encode_as_msgspec_arrays() {
        let batch = KvEventBatch {
            ts: 1.5,
            events: vec![
                KvCacheEvent::BlockStored {
                    block_hashes: vec![[7; 32]],
                    parent_block_hash: None,
                    token_ids: vec![1, 300],
                    block_size: 2,
                },
                KvCacheEvent::AllBlocksCleared,
            ],
        };
        let b = encode_batch(&batch, 0);
        // [1.5, [...], 0]: fixarray of 3, float64 1.5, fixarray of 2 events.
        assert_eq!(&b[..10], &[0x93, 0xcb, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0]);
        assert_eq!(b[10], 0x92);
        // {"type": "BlockStored", ...}: fixmap of 8, "type", fixstr of 11.
        assert_eq!(&b[11..17], &[0x88, 0xa4, b't', b'y', b'p', b'e']);
        assert_eq!(&b[17..29], b"\xabBlockStored");
        assert_eq!(b.last(), Some(&0x00), "data_parallel_rank 0");
        // Token 300 as uint16, the hash as bin8 of 32 bytes.
        assert!(b.windows(3).any(|w| w == [0xcd, 0x01, 0x2c]));
        assert!(b.windows(2).any(|w| w == [0xc4, 32]));
    }
}
