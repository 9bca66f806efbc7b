//! Resident memory follows the work, not `--kv-cache-memory`: a server with a 3 GiB KV cache
//! holds far less than that after start-up (the cache's pages are untouched until a block is
//! first used), and grows as requests fill blocks. Its own test binary, so the process's RSS
//! is this server's.

mod reliability;

use hyper::StatusCode;
use reliability::*;
use serde_json::json;

const CACHE: u64 = 3 << 30;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resident_memory_follows_the_work() {
    let (engine, metrics) = start_engine(|cfg| {
        cfg.kv_cache_memory_bytes = Some(CACHE);
        cfg.enable_prefix_caching = false;
    });
    let server = TestServer::start(engine, metrics, |_| {}).await;
    let addr = server.addr;
    let idle = rss_kib() << 10;
    eprintln!(
        "resident after start-up: {} MiB (KV cache {} MiB)",
        idle >> 20,
        CACHE >> 20
    );
    assert!(
        idle < CACHE / 3,
        "{} MiB resident right after start-up with a {} MiB cache",
        idle >> 20,
        CACHE >> 20
    );

    // 16 different ~900-token prompts at once: about 900 blocks of 16 tokens, ~330 MiB of bf16
    // K and V for this model (30 layers, 3 KV heads of 64).
    let prompts: Vec<String> = (0..16)
        .map(|i| format!("{i} ") + &"spindle keeps every page it needs and no more ".repeat(100))
        .collect();
    let requests = prompts.iter().map(|p| {
        let body = json!({"prompt": p, "max_tokens": 4, "temperature": 0});
        async move { post(addr, "/v1/completions", &body).await }
    });
    for r in futures_util::future::join_all(requests).await {
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    }
    let busy = rss_kib() << 10;
    eprintln!("resident after 16 long prompts: {} MiB", busy >> 20);
    assert!(
        busy > idle + (150 << 20),
        "resident memory should grow with the blocks used: {} -> {} MiB",
        idle >> 20,
        busy >> 20
    );
    assert!(busy < CACHE, "{} MiB", busy >> 20);
    server.shutdown().await;
}
