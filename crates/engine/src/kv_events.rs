//! KV-cache events in vLLM's model: a block of the prefix cache was stored, blocks were removed
//! (evicted), or the whole cache was cleared. Cache-aware routers (vllm-router's `kv_aware`,
//! llm-d's precise prefix-cache scorer) index them to send a request to the replica that
//! already holds its prefix. The block manager records them as they happen; the engine hands
//! each step's events to a [`KvEventSink`] (the ZMQ publisher lives outside the engine and must
//! never block it).
//!
//! Block hashes are vLLM's `sha256_cbor` hashes, so a consumer that tokenizes a prompt can
//! compute them itself: block `i` is `sha256(cbor([hash(i - 1), [token ids], null]))`, with the
//! first block's parent `NONE_HASH = sha256(cbor(seed))` for the string `seed` (vLLM's
//! `PYTHONHASHSEED`), or 32 random bytes when there is no seed. CBOR is canonical (RFC 8949
//! preferred serialization), as `cbor2.dumps(..., canonical=True)` writes it.

use sha2::{Digest, Sha256};

/// A block's content hash (32 bytes, vLLM's `ExternalBlockHash` as bytes).
pub type BlockHash = [u8; 32];

/// One change to the prefix cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCacheEvent {
    /// Consecutive full blocks of one sequence entered the prefix cache: their hashes, the hash
    /// of the block before the first (`None` at the start of a sequence), and their tokens
    /// (`block_size` per block).
    BlockStored {
        block_hashes: Vec<BlockHash>,
        parent_block_hash: Option<BlockHash>,
        token_ids: Vec<u32>,
        block_size: usize,
    },
    /// Blocks left the prefix cache (evicted to make room).
    BlockRemoved { block_hashes: Vec<BlockHash> },
    /// The prefix cache was emptied.
    AllBlocksCleared,
}

/// The events of one engine step.
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventBatch {
    /// Seconds since the Unix epoch.
    pub ts: f64,
    pub events: Vec<KvCacheEvent>,
}

/// Where the engine hands each step's events. Called on the engine thread: implementations must
/// not block (queue and drop when full).
pub trait KvEventSink: Send + Sync {
    fn publish(&self, batch: KvEventBatch);
}

/// vLLM's `sha256_cbor` block hashing.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    none_hash: BlockHash,
}

impl BlockHasher {
    /// Hash chains rooted at `sha256(cbor(seed))` (vLLM with `PYTHONHASHSEED=seed`), or at 32
    /// random bytes without a seed (then no outside consumer can recompute the hashes).
    pub fn new(seed: Option<&str>) -> Self {
        let none_hash = match seed {
            Some(seed) => {
                let mut buf = Vec::with_capacity(seed.len() + 9);
                cbor_head(&mut buf, 3, seed.len() as u64);
                buf.extend_from_slice(seed.as_bytes());
                Sha256::digest(&buf).into()
            }
            None => rand::random(),
        };
        Self { none_hash }
    }

    /// The hash of a full block with these tokens after the block hashed `parent` (`None`: the
    /// first block of a sequence).
    pub fn hash(&self, parent: Option<&BlockHash>, tokens: &[u32]) -> BlockHash {
        self.hash_with_salt(parent, tokens, None)
    }

    /// [`Self::hash`] with vLLM's extra keys: a salted sequence's first block carries
    /// `(cache_salt,)`, so its hash differs from the same tokens in another namespace.
    pub fn hash_with_salt(
        &self,
        parent: Option<&BlockHash>,
        tokens: &[u32],
        salt: Option<&str>,
    ) -> BlockHash {
        let parent = parent.unwrap_or(&self.none_hash);
        let mut buf = Vec::with_capacity(40 + tokens.len() * 5);
        cbor_head(&mut buf, 4, 3); // (parent, tokens, extra_keys)
        cbor_head(&mut buf, 2, parent.len() as u64);
        buf.extend_from_slice(parent);
        cbor_head(&mut buf, 4, tokens.len() as u64);
        for &t in tokens {
            cbor_head(&mut buf, 0, u64::from(t));
        }
        match salt {
            Some(salt) => {
                cbor_head(&mut buf, 4, 1);
                cbor_head(&mut buf, 3, salt.len() as u64);
                buf.extend_from_slice(salt.as_bytes());
            }
            // null: no extra keys (no LoRA, multimodal input or cache salt)
            None => buf.push(0xf6),
        }
        Sha256::digest(&buf).into()
    }
}

/// A CBOR item head: major type and argument in the shortest form.
fn cbor_head(buf: &mut Vec<u8>, major: u8, value: u64) {
    let m = major << 5;
    match value {
        0..=23 => buf.push(m | value as u8),
        24..=0xff => buf.extend_from_slice(&[m | 24, value as u8]),
        0x100..=0xffff => {
            buf.push(m | 25);
            buf.extend_from_slice(&(value as u16).to_be_bytes());
        }
        0x1_0000..=0xffff_ffff => {
            buf.push(m | 26);
            buf.extend_from_slice(&(value as u32).to_be_bytes());
        }
        _ => {
            buf.push(m | 27);
            buf.extend_from_slice(&value.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(h: &[u8]) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn cbor_heads_are_canonical() {
        let enc = |major, v| {
            let mut b = Vec::new();
            cbor_head(&mut b, major, v);
            b
        };
        assert_eq!(enc(0, 0), [0x00]);
        assert_eq!(enc(0, 23), [0x17]);
        assert_eq!(enc(0, 24), [0x18, 24]);
        assert_eq!(enc(0, 500), [0x19, 0x01, 0xf4]);
        assert_eq!(enc(0, 70_000), [0x1a, 0x00, 0x01, 0x11, 0x70]);
        assert_eq!(enc(4, 3), [0x83]);
        assert_eq!(enc(2, 32), [0x58, 0x20]);
        assert_eq!(enc(3, 2), [0x62]);
    }

    /// Reference values from Python: `hashlib.sha256(cbor2.dumps(x, canonical=True))` (see
    /// tests/kv_events for the end-to-end check against cbor2).
    #[test]
    fn hashes_match_vllm_sha256_cbor() {
        let h = BlockHasher::new(Some("42"));
        // sha256(cbor2.dumps("42")) = sha256(b"\x62\x34\x32")
        assert_eq!(hex(&h.none_hash), hex(&Sha256::digest([0x62, b'4', b'2'])));
        let first = h.hash(None, &[1, 2, 3]);
        let mut manual = vec![0x83, 0x58, 0x20];
        manual.extend_from_slice(&h.none_hash);
        manual.extend_from_slice(&[0x83, 0x01, 0x02, 0x03, 0xf6]);
        assert_eq!(first, <[u8; 32]>::from(Sha256::digest(&manual)));
        // The chain depends on the parent.
        assert_ne!(h.hash(Some(&first), &[1, 2, 3]), first);
        // A salt is an extra key: ("s",) after the tokens.
        let mut salted = manual[..manual.len() - 1].to_vec();
        salted.extend_from_slice(&[0x81, 0x61, b's']);
        assert_eq!(
            h.hash_with_salt(None, &[1, 2, 3], Some("s")),
            <[u8; 32]>::from(Sha256::digest(&salted))
        );
        // Without a seed the root is random: two hashers disagree.
        assert_ne!(
            BlockHasher::new(None).hash(None, &[1]),
            BlockHasher::new(None).hash(None, &[1])
        );
    }
}
