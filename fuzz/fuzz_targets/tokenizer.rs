//! The default model's byte-level BPE tokenizer (built from the GGUF vocabulary): encoding any
//! text never fails or panics, ids stay inside the vocabulary, and decoding gives the text back
//! exactly, unless the text holds a byte the vocabulary has no token for (SmolLM2 lacks 21 of
//! the 256 byte tokens, e.g. 0x1d; such bytes are dropped, as Hugging Face's tokenizer does).

#![no_main]

use std::collections::HashSet;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// Bytes whose GPT-2 byte-level character is not in the vocabulary.
fn unrepresentable() -> &'static HashSet<u8> {
    static SET: OnceLock<HashSet<u8>> = OnceLock::new();
    SET.get_or_init(|| {
        let bundle = spindle_fuzz::bundle();
        let printable = |b: u32| {
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b)
        };
        let mut extra = 0;
        let mut missing = HashSet::new();
        for b in 0u32..256 {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            let token = char::from_u32(c).map(String::from).unwrap_or_default();
            if bundle.tokenizer.token_to_id(&token).is_none() {
                missing.insert(b as u8);
            }
        }
        missing
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let bundle = spindle_fuzz::bundle();
    let ids = bundle
        .encode(&text, true)
        .expect("encoding text never fails");
    assert!(ids.iter().all(|&id| (id as usize) < bundle.vocab_size()));
    let back = bundle
        .decode(&ids, false)
        .expect("decoding our own ids never fails");
    if !text.bytes().any(|b| unrepresentable().contains(&b)) {
        assert_eq!(back, text, "round trip changed the text (ids {ids:?})");
    }
});
