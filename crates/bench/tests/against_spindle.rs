//! End to end against the real server: start `target/release/spindle serve` on the default model
//! on a free port, run `bench serve` (20 random prompts, input 64, output 16, concurrency 8,
//! ignore_eos) and check the report against the server's own `/metrics` counters.
//!
//! Needs the release binary (`cargo build --release -p spindle`) and the default model
//! (`scripts/fetch-model.sh`). Without them the test says so and passes, unless
//! `SPINDLE_BENCH_REQUIRE_SERVER=1` is set (then it fails). `SPINDLE_BIN` overrides the binary.
//! Nothing here depends on how fast the machine is.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use spindle_bench::client::{BaseUrl, HttpClient};
use spindle_bench::runner::{prometheus_sum, run_serve_async, runtime};
use spindle_bench::{DatasetSpec, EndpointKind, ServeConfig};

const MODEL: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn spindle_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("SPINDLE_BIN") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("release/spindle")
}

/// Kills the server when the test ends, however it ends.
struct Server {
    child: Child,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

async fn counters(client: &HttpClient) -> [f64; 3] {
    let (status, text) = client
        .get_text("/metrics", Duration::from_secs(30))
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200, "GET /metrics");
    [
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
        "vllm:request_success_total",
    ]
    .map(|name| prometheus_sum(&text, name).unwrap_or(0.0))
}

#[test]
fn bench_serve_matches_server_metrics() {
    let bin = spindle_binary();
    let model = workspace_root().join(MODEL);
    if !bin.exists() || !model.exists() {
        let why = format!(
            "needs {} (cargo build --release -p spindle) and {} (scripts/fetch-model.sh)",
            bin.display(),
            model.display()
        );
        if std::env::var_os("SPINDLE_BENCH_REQUIRE_SERVER").is_some() {
            panic!("{why}");
        }
        eprintln!("skipping the end-to-end bench test: {why}");
        return;
    }

    let port = free_port();
    let log = std::env::temp_dir().join(format!(
        "spindle-bench-e2e-{}-{port}.log",
        std::process::id()
    ));
    let log_file = std::fs::File::create(&log).expect("create the server log");
    let child = Command::new(&bin)
        .current_dir(workspace_root())
        .args([
            "serve",
            "--model",
            MODEL,
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--kv-cache-memory",
            "256MiB",
            "--max-model-len",
            "2048",
        ])
        .arg("--data-dir")
        .arg(std::env::temp_dir().join(format!("spindle-bench-test-{port}")))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("clone log handle"))
        .stderr(log_file)
        .spawn()
        .expect("start spindle serve");
    let mut server = Server { child, log };

    let rt = runtime().expect("tokio runtime");
    let base = format!("http://127.0.0.1:{port}");
    let client = HttpClient::new(BaseUrl::parse(&base).expect("base url"), None);
    rt.block_on(async {
        // Model loading takes a while on a busy machine; give it generously long.
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "spindle serve exited with {status} during start-up:\n{}",
                    server.log_tail()
                );
            }
            if let Ok((200, _)) = client.get_text("/health", Duration::from_secs(5)).await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "spindle serve not healthy after 300 s:\n{}",
                server.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }

        let before = counters(&client).await;
        let cfg = ServeConfig {
            base_url: base.clone(),
            endpoint: EndpointKind::Completions,
            dataset: DatasetSpec::Random {
                input_len: 64,
                output_len: 16,
                range_ratio: 0.0,
            },
            num_prompts: 20,
            max_concurrency: Some(8),
            ignore_eos: true,
            metric_percentiles: vec![50.0, 99.0],
            show_progress: false,
            ..ServeConfig::default()
        };
        let r = run_serve_async(&cfg).await.expect("bench serve");
        let after = counters(&client).await;
        let report = spindle_bench::format_report(&r);

        let m = &r.metrics;
        assert_eq!((m.completed, m.failed), (20, 0), "{report}");
        assert_eq!(
            m.requests_without_usage, 0,
            "spindle sends usage when asked"
        );
        assert_eq!(
            m.total_output_tokens,
            20 * 16,
            "ignore_eos: every request generates max_tokens\n{report}"
        );
        assert_eq!(
            after[0] - before[0],
            m.total_output_tokens as f64,
            "vllm:generation_tokens_total delta\n{report}"
        );
        assert_eq!(
            after[1] - before[1],
            m.total_input_tokens as f64,
            "vllm:prompt_tokens_total delta\n{report}"
        );
        assert_eq!(
            after[2] - before[2],
            20.0,
            "vllm:request_success_total delta"
        );
        let sc = r
            .server_counters
            .as_ref()
            .expect("the run scraped /metrics itself");
        assert_eq!(sc.generation_tokens, Some(m.total_output_tokens as f64));

        // Per-request arrays are complete and coherent.
        assert_eq!(r.output_lens, vec![16; 20]);
        assert!(r.errors.iter().all(String::is_empty));
        for i in 0..20 {
            // ~64 tokens by construction (random words ≈ 1 token each plus an id).
            assert!(
                (48..=80).contains(&r.input_lens[i]),
                "prompt {i}: {} tokens",
                r.input_lens[i]
            );
            assert!(r.ttfts[i] > 0.0 && r.e2els[i] >= r.ttfts[i]);
            assert!(!r.itls[i].is_empty() && r.itls[i].len() <= 15);
        }
        assert!(m.max_concurrent_requests <= 8);
        assert!(m.ttft_ms.count == 20 && m.tpot_ms.count == 20);

        // The chat endpoint counts the template's tokens too; usage still matches /metrics.
        let before = counters(&client).await;
        let chat = ServeConfig {
            endpoint: EndpointKind::Chat,
            num_prompts: 4,
            max_concurrency: Some(4),
            ..cfg
        };
        let r = run_serve_async(&chat).await.expect("bench serve (chat)");
        let after = counters(&client).await;
        assert_eq!(
            (r.metrics.completed, r.metrics.total_output_tokens),
            (4, 64)
        );
        assert_eq!(after[0] - before[0], 64.0);
        assert_eq!(after[1] - before[1], r.metrics.total_input_tokens as f64);
        assert!(
            r.input_lens.iter().all(|&n| n > 64),
            "the chat template adds tokens: {:?}",
            r.input_lens
        );
    });
}
