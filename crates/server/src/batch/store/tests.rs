//! The store on a temporary directory: locking, files, the batch lifecycle, exactly-once
//! results and the files a finished batch produces.

use super::*;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spindle-store-{name}-{}-{}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn lines(n: usize) -> Vec<NewLine> {
    (0..n)
        .map(|i| NewLine {
            custom_id: format!("req-{i}"),
            body: format!("{{\"prompt\":\"{i}\"}}"),
        })
        .collect()
}

fn counter() -> impl FnMut() -> String {
    let mut n = 0;
    move || {
        n += 1;
        format!("file-out-{n}")
    }
}

#[test]
fn a_second_store_on_the_same_directory_is_refused_until_the_first_is_gone() {
    let dir = temp_dir("lock");
    let first = BatchStore::open(&dir).unwrap();
    let err = BatchStore::open(&dir).unwrap_err();
    assert!(matches!(err, StoreError::Locked(_)), "{err}");
    assert!(err.to_string().contains("--data-dir"));
    drop(first);
    BatchStore::open(&dir).unwrap();
}

#[test]
fn files_are_stored_listed_and_deleted() {
    let dir = temp_dir("files");
    let store = BatchStore::open(&dir).unwrap();
    let a = store
        .insert_file("file-a", "a.jsonl", "batch", b"{}\n", 10)
        .unwrap();
    assert_eq!((a.bytes, a.object, a.status), (3, "file", "processed"));
    store
        .insert_file("file-b", "b.jsonl", "batch", b"x", 11)
        .unwrap();
    store
        .insert_file("file-c", "c.jsonl", "batch_output", b"y", 12)
        .unwrap();
    assert_eq!(store.file_content("file-a").unwrap().unwrap(), b"{}\n");
    let all = store.list_files(None, None, 10, false).unwrap();
    let ids: Vec<_> = all.data.iter().map(|f| f.id.as_str()).collect();
    assert_eq!(ids, ["file-c", "file-b", "file-a"]);
    let page = store.list_files(None, Some("file-c"), 1, false).unwrap();
    assert_eq!((page.data[0].id.as_str(), page.has_more), ("file-b", true));
    let batch_only = store.list_files(Some("batch"), None, 10, true).unwrap();
    assert_eq!(batch_only.data.len(), 2);
    assert_eq!(batch_only.data[0].id, "file-a");
    assert!(store.delete_file("file-a").unwrap());
    assert!(!store.delete_file("file-a").unwrap());
    assert!(store.file("file-a").unwrap().is_none());
}

#[test]
fn a_batch_runs_through_its_lifecycle_and_survives_reopening() {
    let dir = temp_dir("lifecycle");
    let store = BatchStore::open(&dir).unwrap();
    let meta = serde_json::json!({"job": "nightly"});
    let b = store
        .create_batch(
            "batch-1",
            "/v1/completions",
            "file-in",
            "24h",
            Some(&meta),
            100,
            100 + 86400,
        )
        .unwrap();
    assert_eq!(b.status, BatchStatus::Validating);
    assert_eq!(b.metadata, Some(meta));
    assert!(store.start_batch("batch-1", &lines(3), 101).unwrap());
    assert!(
        !store.start_batch("batch-1", &lines(3), 101).unwrap(),
        "only once"
    );
    let b = store.batch("batch-1").unwrap().unwrap();
    assert_eq!(
        (b.status, b.in_progress_at),
        (BatchStatus::InProgress, Some(101))
    );
    assert_eq!(
        b.request_counts,
        RequestCounts {
            total: 3,
            completed: 0,
            failed: 0
        }
    );

    assert!(store
        .record_result("batch-1", 0, LineOutcome::Succeeded, "{\"ok\":0}")
        .unwrap());
    assert!(
        !store
            .record_result("batch-1", 0, LineOutcome::Failed, "{\"again\":0}")
            .unwrap(),
        "a line is answered once"
    );
    assert!(store
        .record_result("batch-1", 2, LineOutcome::Failed, "{\"err\":2}")
        .unwrap());
    // A restart (the store reopened) sees exactly what was recorded.
    drop(store);
    let store = BatchStore::open(&dir).unwrap();
    assert_eq!(
        store.unfinished_batches().unwrap(),
        vec![("batch-1".to_string(), BatchStatus::InProgress)]
    );
    let pending = store.pending_lines("batch-1", 0, 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].index, pending[0].custom_id.as_str()),
        (1, "req-1")
    );
    assert!(store
        .record_result("batch-1", 1, LineOutcome::Succeeded, "{\"ok\":1}")
        .unwrap());

    let mut ids = counter();
    let to_finalizing = store
        .transition(
            "batch-1",
            &[BatchStatus::InProgress],
            BatchStatus::Finalizing,
            102,
        )
        .unwrap()
        .unwrap();
    assert!(to_finalizing.1);
    assert!(store
        .complete(
            "batch-1",
            &[BatchStatus::Finalizing],
            BatchStatus::Completed,
            None,
            103,
            &mut ids
        )
        .unwrap());
    let b = store.batch("batch-1").unwrap().unwrap();
    assert_eq!(b.status, BatchStatus::Completed);
    assert_eq!(
        b.request_counts,
        RequestCounts {
            total: 3,
            completed: 2,
            failed: 1
        }
    );
    assert_eq!((b.finalizing_at, b.completed_at), (Some(102), Some(103)));
    let out = store
        .file_content(b.output_file_id.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(out, b"{\"ok\":0}\n{\"ok\":1}\n");
    let err = store
        .file_content(b.error_file_id.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(err, b"{\"err\":2}\n");
    assert_eq!(
        store
            .file(b.output_file_id.as_deref().unwrap())
            .unwrap()
            .unwrap()
            .purpose,
        "batch_output"
    );
    assert!(store.unfinished_batches().unwrap().is_empty());
    // Completing again changes nothing.
    assert!(!store
        .complete(
            "batch-1",
            &[BatchStatus::Finalizing],
            BatchStatus::Completed,
            None,
            104,
            &mut ids
        )
        .unwrap());
}

#[test]
fn expiry_turns_pending_lines_into_error_lines_and_cancellation_leaves_them_out() {
    let dir = temp_dir("expire");
    let store = BatchStore::open(&dir).unwrap();
    for id in ["b-exp", "b-can"] {
        store
            .create_batch(id, "/v1/completions", "f", "24h", None, 1, 2)
            .unwrap();
        store.start_batch(id, &lines(3), 1).unwrap();
        store
            .record_result(id, 0, LineOutcome::Succeeded, "{\"ok\":0}")
            .unwrap();
    }
    let mut ids = counter();
    let expired = |custom_id: &str| format!("{{\"expired\":\"{custom_id}\"}}");
    store
        .complete(
            "b-exp",
            &[BatchStatus::InProgress],
            BatchStatus::Expired,
            Some(&expired),
            3,
            &mut ids,
        )
        .unwrap();
    let b = store.batch("b-exp").unwrap().unwrap();
    assert_eq!((b.status, b.expired_at), (BatchStatus::Expired, Some(3)));
    assert_eq!(b.request_counts.failed, 2);
    let err = store
        .file_content(b.error_file_id.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(err).unwrap(),
        "{\"expired\":\"req-1\"}\n{\"expired\":\"req-2\"}\n"
    );

    let (b, moved) = store
        .transition(
            "b-can",
            &[BatchStatus::InProgress],
            BatchStatus::Cancelling,
            4,
        )
        .unwrap()
        .unwrap();
    assert!(moved && b.status == BatchStatus::Cancelling);
    store
        .complete(
            "b-can",
            &[BatchStatus::Cancelling],
            BatchStatus::Cancelled,
            None,
            5,
            &mut ids,
        )
        .unwrap();
    let b = store.batch("b-can").unwrap().unwrap();
    assert_eq!(b.status, BatchStatus::Cancelled);
    assert_eq!(
        b.request_counts,
        RequestCounts {
            total: 3,
            completed: 1,
            failed: 0
        }
    );
    assert!(b.error_file_id.is_none() && b.output_file_id.is_some());
}

#[test]
fn a_failed_validation_keeps_its_errors_and_batches_list_newest_first() {
    let dir = temp_dir("fail");
    let store = BatchStore::open(&dir).unwrap();
    for i in 0..3 {
        store
            .create_batch(
                &format!("b{i}"),
                "/v1/completions",
                "f",
                "24h",
                None,
                i,
                i + 1,
            )
            .unwrap();
    }
    let errors = vec![BatchError {
        code: "duplicate_custom_id".into(),
        message: "dup".into(),
        param: Some("custom_id".into()),
        line: Some(2),
    }];
    store.fail_batch("b1", &errors, 9).unwrap();
    let b = store.batch("b1").unwrap().unwrap();
    assert_eq!((b.status, b.failed_at), (BatchStatus::Failed, Some(9)));
    assert_eq!(b.errors.unwrap().data, errors);
    let page = store.list_batches(None, 2).unwrap();
    let ids: Vec<_> = page.data.iter().map(|b| b.id.as_str()).collect();
    assert_eq!((ids, page.has_more), (vec!["b2", "b1"], true));
    let page = store.list_batches(Some("b1"), 2).unwrap();
    assert_eq!(page.data.len(), 1);
    assert!(!page.has_more);
}
