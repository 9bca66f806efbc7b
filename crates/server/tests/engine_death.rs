//! Engine death is visible: with the test-only fault injection armed, a request whose prompt
//! carries the marker makes the engine thread panic, fail, or hang. Every request in flight then
//! gets an error (streams: a final SSE error event, then `[DONE]`; non-streaming: a 500 OpenAI
//! error), `/health` turns 503 within a second, and new requests get 503 with Retry-After. A
//! hang is declared death by the watchdog after the stall timeout. (That `spindle serve` then
//! exits non-zero is tested in crates/spindle/tests/engine_death_exit.rs.)

mod reliability;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Response, StatusCode};
use reliability::*;
use serde_json::{json, Value};
use spindle_engine::{EngineHandle, FaultInjection};
use tokio::task::JoinHandle;

const MARKER: &str = "ZQX-FAULT-MARKER";

fn long_stream(i: usize) -> Vec<u8> {
    json!({"messages": [{"role": "user", "content": format!("Write a long essay, part {i}.")}],
           "max_tokens": 800, "ignore_eos": true, "stream": true})
    .to_string()
    .into_bytes()
}

fn long_blocking(i: usize) -> Vec<u8> {
    json!({"prompt": format!("A long text, number {i}:"), "max_tokens": 800, "ignore_eos": true})
        .to_string()
        .into_bytes()
}

fn marked() -> Vec<u8> {
    json!({"messages": [{"role": "user", "content": format!("Please {MARKER} now")}], "max_tokens": 5, "stream": true})
        .to_string()
        .into_bytes()
}

/// The rest of a stream must be: maybe more chunks, then one error event (500), then `[DONE]`.
fn assert_stream_ends_with_error(head: &str, rest: &str) {
    let body = format!("{head}{rest}");
    let events = sse_events(&body).unwrap_or_else(|e| panic!("{e}"));
    let n = events.len();
    assert!(n >= 2, "stream too short: {body}");
    assert_eq!(events[n - 1], "[DONE]", "{body}");
    let err: Value = serde_json::from_str(&events[n - 2])
        .unwrap_or_else(|e| panic!("last event not JSON ({e}): {body}"));
    assert_openai_error(StatusCode::INTERNAL_SERVER_ERROR, events[n - 2].as_bytes());
    let msg = err["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("engine"),
        "the error should say the engine died: {msg}"
    );
    for e in &events[..n - 2] {
        assert!(
            !e.contains("\"error\""),
            "only the last event may be an error: {body}"
        );
    }
}

/// The requests in flight when the fault hits.
struct InFlight {
    streams: Vec<(Response<Incoming>, String, JoinHandle<()>)>,
    blocking: Vec<JoinHandle<Reply>>,
}

async fn start_in_flight(addr: SocketAddr, streams: usize, blocking: usize) -> InFlight {
    let ct = [("content-type", "application/json")];
    let mut open_streams = Vec::new();
    for i in 0..streams {
        let (mut resp, conn) = open(addr, "POST", "/v1/chat/completions", &ct, long_stream(i))
            .await
            .expect("send");
        assert_eq!(resp.status(), StatusCode::OK);
        let head = wait_first_token(&mut resp).await;
        open_streams.push((resp, head, conn));
    }
    let blocking: Vec<JoinHandle<Reply>> = (0..blocking)
        .map(|i| {
            tokio::spawn(async move {
                call(
                    addr,
                    "POST",
                    "/v1/completions",
                    &[("content-type", "application/json")],
                    long_blocking(i),
                )
                .await
            })
        })
        .collect();
    // Wait until the non-streaming requests run too.
    let deadline = Instant::now() + Duration::from_secs(30);
    while engine_gauges(addr).await.0 < (streams + blocking.len()) as f64 {
        assert!(
            Instant::now() < deadline,
            "in-flight requests never all ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    InFlight {
        streams: open_streams,
        blocking,
    }
}

/// Everything the issue asks of a dead engine, checked against a running server.
async fn assert_death_is_visible(
    addr: SocketAddr,
    engine: &EngineHandle,
    in_flight: InFlight,
    death_deadline: Duration,
) {
    let hit = Instant::now();
    while !engine.is_dead() {
        assert!(
            hit.elapsed() < death_deadline,
            "the engine did not die within {death_deadline:?} of the fault"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let died = Instant::now();
    // /health turns 503 within a second of the engine dying.
    loop {
        if get(addr, "/health").await.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(
            died.elapsed() < Duration::from_secs(1),
            "/health still 200 a second after the engine died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "engine dead {:.0} ms after the fault was triggered; /health 503 {:.0} ms after that",
        died.duration_since(hit).as_secs_f64() * 1e3,
        died.elapsed().as_secs_f64() * 1e3
    );

    // Streams in flight: error event, then [DONE] (the status line was 200 already).
    for (resp, head, conn) in in_flight.streams {
        let rest = tokio::time::timeout(Duration::from_secs(30), resp.into_body().collect())
            .await
            .expect("stream ends after the engine died")
            .expect("stream body")
            .to_bytes();
        assert_stream_ends_with_error(&head, &String::from_utf8_lossy(&rest));
        conn.abort();
    }
    // Non-streaming requests in flight: 500 with an OpenAI error body.
    for b in in_flight.blocking {
        let r = tokio::time::timeout(Duration::from_secs(30), b)
            .await
            .expect("answered")
            .expect("task");
        assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", r.text());
        assert_openai_error(StatusCode::INTERNAL_SERVER_ERROR, &r.body);
    }
    // New requests: 503 with Retry-After, both kinds.
    for stream in [false, true] {
        let r = post(addr, "/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": stream})).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.text());
        assert!(r.headers.contains_key("retry-after"));
        assert_openai_error(StatusCode::SERVICE_UNAVAILABLE, &r.body);
    }
    let r = get(addr, "/health").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_openai_error(StatusCode::SERVICE_UNAVAILABLE, &r.body);
}

async fn fault_scenario(fault: FaultInjection, stall_timeout: Duration) {
    let (engine, metrics) = start_engine(|c| {
        c.fault_injection = Some(fault.clone());
        c.stall_timeout = Some(stall_timeout);
    });
    let s = TestServer::start(engine.clone(), metrics, |c| c.stall_timeout = stall_timeout).await;
    assert_eq!(get(s.addr, "/health").await.status, StatusCode::OK);
    let in_flight = start_in_flight(s.addr, 3, 2).await;

    // The marked request: it is in flight too when the fault hits.
    let (mut marked_resp, marked_conn) = open(
        s.addr,
        "POST",
        "/v1/chat/completions",
        &[("content-type", "application/json")],
        marked(),
    )
    .await
    .expect("send");
    assert_eq!(marked_resp.status(), StatusCode::OK);
    // Generous: the fault fires at the engine's next step, a hang after the stall timeout.
    let death_deadline = stall_timeout.min(Duration::from_secs(5)) + Duration::from_secs(30);
    assert_death_is_visible(s.addr, &engine, in_flight, death_deadline).await;
    let marked_body = marked_resp
        .body_mut()
        .collect()
        .await
        .expect("marked body")
        .to_bytes();
    assert_stream_ends_with_error("", &String::from_utf8_lossy(&marked_body));
    marked_conn.abort();

    assert!(engine.is_dead());
    let reason = engine.death_reason().unwrap_or_default();
    println!("{fault:?}: death reason: {reason}");
    match fault {
        FaultInjection::Panic { .. } => assert!(reason.contains("panicked"), "{reason}"),
        FaultInjection::Error { .. } => assert!(reason.contains("failed"), "{reason}"),
        FaultInjection::Stall { .. } => assert!(reason.contains("no progress"), "{reason}"),
    }
    // The engine thread released everything it held.
    wait_engine_idle(s.addr, Duration::from_secs(10)).await;
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_panic_fails_in_flight_requests_and_health() {
    fault_scenario(
        FaultInjection::Panic {
            marker: MARKER.into(),
        },
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_error_fails_in_flight_requests_and_health() {
    fault_scenario(
        FaultInjection::Error {
            marker: MARKER.into(),
        },
        Duration::from_secs(30),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_hang_is_declared_dead_after_the_stall_timeout() {
    fault_scenario(
        FaultInjection::Stall {
            marker: MARKER.into(),
        },
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_marker_are_unaffected() {
    let (engine, metrics) = start_engine(|c| {
        c.fault_injection = Some(FaultInjection::Panic {
            marker: MARKER.into(),
        })
    });
    let s = TestServer::start(engine.clone(), metrics, |_| {}).await;
    let r = post(
        s.addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert!(!engine.is_dead());
    assert_eq!(get(s.addr, "/health").await.status, StatusCode::OK);
    s.shutdown().await;
    engine.shutdown();
}
