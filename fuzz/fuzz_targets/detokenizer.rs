//! The engine's incremental detokenizer on arbitrary id sequences (including ids outside the
//! vocabulary and partial UTF-8 byte tokens): never panics, and for valid ids the streamed
//! pieces concatenate to exactly the one-shot decode (no lost, duplicated or replaced text)
//! whenever the prompt context does not end inside a character.

#![no_main]

use libfuzzer_sys::fuzz_target;
use spindle_engine::detokenizer::IncrementalDetokenizer;

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let skip_special = flags & 1 == 1;
    let bundle = spindle_fuzz::bundle();
    let vocab = bundle.vocab_size() as u32;
    // Little-endian u16 ids; ids past the vocabulary (up to 65535) are kept as they are.
    let ids: Vec<u32> = rest
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
        .collect();
    let prompt_len = (flags >> 1) as usize % 8;
    let (prompt, output) = ids.split_at(prompt_len.min(ids.len()));
    let tk = &bundle.tokenizer;
    let mut detok = IncrementalDetokenizer::new(prompt, skip_special);
    let mut streamed = String::new();
    let mut failed = false;
    for &id in output {
        match detok.push(tk, id) {
            Ok(piece) => streamed.push_str(&piece),
            Err(_) => {
                assert!(id >= vocab, "a valid id {id} failed to detokenize");
                failed = true;
                break;
            }
        }
    }
    if failed {
        return;
    }
    streamed.push_str(&detok.finish(tk).expect("finish after valid ids"));
    // When the prompt context ends inside a UTF-8 character that the output completes, the
    // streamed text attributes the character to the prompt (as vLLM does) while a decode of the
    // output alone shows a replacement character: compare only with a clean context.
    let context_clean = prompt.iter().all(|&id| id < vocab)
        && !tk
            .decode(prompt, skip_special)
            .is_ok_and(|t| t.ends_with('\u{FFFD}'));
    if context_clean {
        let whole = tk.decode(output, skip_special).expect("decode valid ids");
        assert_eq!(
            streamed, whole,
            "incremental detokenization differs from decode (prompt {prompt:?}, output {output:?})"
        );
    }
});
