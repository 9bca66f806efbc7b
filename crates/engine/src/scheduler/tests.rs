//! The scheduler on fake requests: no model, no sampler. `run_step` plays the engine's part
//! (compute the scheduled tokens, append a made-up token to every sequence that sampled).

use super::*;

const BLOCK: usize = 4;

fn scheduler(num_blocks: usize, max_seqs: usize, budget: usize, prefix: bool) -> Scheduler {
    Scheduler::new(
        BlockManager::new(num_blocks, BLOCK, prefix),
        max_seqs,
        budget,
        SchedulingPolicy::Fcfs,
    )
}

fn prompt(first: u32, len: usize) -> Vec<u32> {
    (first..first + len as u32).collect()
}

/// One engine step without a model: schedule, mark the KV computed, sample a fake token.
fn run_step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    s.on_step_done(&out.scheduled);
    for e in &out.scheduled {
        if e.samples {
            s.append_token(e.id, 7);
        }
    }
    s.blocks().check_invariants().expect("block bookkeeping");
    out
}

fn ids(out: &SchedulerOutput) -> Vec<SeqId> {
    out.scheduled.iter().map(|e| e.id).collect()
}

fn sizes(out: &SchedulerOutput) -> Vec<(SeqId, usize)> {
    out.scheduled
        .iter()
        .map(|e| (e.id, e.num_new_tokens))
        .collect()
}

#[test]
fn decodes_take_the_budget_first_and_prefills_get_the_rest() {
    let mut s = scheduler(64, 16, 10, false);
    s.add(1, prompt(0, 3), Urgency::default());
    s.add(2, prompt(100, 3), Urgency::default());
    assert_eq!(sizes(&run_step(&mut s)), vec![(1, 3), (2, 3)]);
    // Both decode now; a new 20-token prompt gets what is left of the budget (10 - 2).
    s.add(3, prompt(200, 20), Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(1, 1), (2, 1), (3, 8)]);
    assert_eq!(out.num_tokens(), 10);
    assert!(
        !out.scheduled[2].samples,
        "a partial prefill samples nothing"
    );
}

#[test]
fn a_long_prompt_is_chunked_over_steps() {
    let mut s = scheduler(64, 16, 8, false);
    s.add(1, prompt(0, 20), Urgency::default());
    let chunks: Vec<ScheduledSeq> = (0..3).map(|_| run_step(&mut s).scheduled[0]).collect();
    assert_eq!(
        chunks
            .iter()
            .map(|c| (c.num_computed, c.num_new_tokens, c.samples))
            .collect::<Vec<_>>(),
        vec![(0, 8, false), (8, 8, false), (16, 4, true)]
    );
    assert_eq!(s.seq(1).map(|q| q.num_output()), Some(1));
    // Then it decodes one token per step.
    assert_eq!(sizes(&run_step(&mut s)), vec![(1, 1)]);
}

#[test]
fn a_chunked_prefill_never_stalls_running_decodes() {
    let mut s = scheduler(64, 16, 6, false);
    s.add(1, prompt(0, 2), Urgency::default());
    run_step(&mut s);
    s.add(2, prompt(50, 30), Urgency::default());
    for _ in 0..5 {
        let out = run_step(&mut s);
        assert_eq!(out.scheduled[0].id, 1, "the decode comes first");
        assert_eq!(out.scheduled[0].num_new_tokens, 1);
        assert_eq!(out.num_tokens(), 6);
    }
}

#[test]
fn running_out_of_blocks_preempts_the_latest_admitted() {
    // 6 blocks of 4 = 24 slots; three 8-token prompts take 2 blocks each.
    let mut s = scheduler(6, 16, 64, false);
    for id in 1..=3 {
        s.add(id, prompt(10 * id as u32, 8), Urgency::default());
    }
    assert_eq!(ids(&run_step(&mut s)), vec![1, 2, 3]);
    assert_eq!(s.blocks().num_free_blocks(), 0);
    // Each needs a third block for its 9th token: the newest (3) is preempted for the first.
    let out = run_step(&mut s);
    assert_eq!(out.preempted, vec![3]);
    assert_eq!(sizes(&out), vec![(1, 1), (2, 1)]);
    assert_eq!(s.num_waiting(), 1);
    assert_eq!(s.seq(3).map(|q| q.num_computed()), Some(0));
    assert!(s.seq(3).is_some_and(|q| q.table().is_none()));
}

#[test]
fn a_preempted_sequence_resumes_with_its_output_recomputed() {
    let mut s = scheduler(6, 16, 64, false);
    for id in 1..=3 {
        s.add(id, prompt(10 * id as u32, 8), Urgency::default());
    }
    run_step(&mut s);
    let out = run_step(&mut s);
    assert_eq!(out.preempted, vec![3]);
    let before: Vec<u32> = s.seq(3).map(|q| q.tokens().to_vec()).unwrap_or_default();
    assert_eq!(
        before.len(),
        9,
        "prompt + the token sampled before preemption"
    );
    s.finish(1);
    s.finish(2);
    // Readmitted: prompt and output so far are recomputed in one go, then it samples.
    let out = run_step(&mut s);
    assert_eq!(
        out.scheduled,
        vec![ScheduledSeq {
            id: 3,
            num_new_tokens: 9,
            num_computed: 0,
            samples: true
        }]
    );
    let q = s.seq(3).expect("still there");
    assert_eq!(&q.tokens()[..9], before.as_slice());
    assert_eq!(q.num_output(), 2);
    assert_eq!(q.num_computed(), 9);
}

#[test]
fn prefix_cache_hits_reduce_the_tokens_to_compute() {
    let mut s = scheduler(32, 16, 64, true);
    let shared = prompt(0, 12);
    s.add(1, shared.clone(), Urgency::default());
    run_step(&mut s);
    s.finish(1);
    let mut longer = shared.clone();
    longer.extend([500, 501]);
    s.add(2, longer, Urgency::default());
    let out = run_step(&mut s);
    // 12 tokens = 3 full cached blocks: only the 2 new tokens run.
    assert_eq!(
        out.scheduled,
        vec![ScheduledSeq {
            id: 2,
            num_new_tokens: 2,
            num_computed: 12,
            samples: true
        }]
    );
    let (queries, hits) = s.blocks().prefix_cache_stats();
    assert!(hits > 0 && queries >= hits);
}

#[test]
fn a_fully_cached_prompt_still_computes_its_last_block() {
    let mut s = scheduler(32, 16, 64, true);
    s.add(1, prompt(0, 8), Urgency::default());
    run_step(&mut s);
    s.add(2, prompt(0, 8), Urgency::default());
    let out = run_step(&mut s);
    let e = out.scheduled.iter().find(|e| e.id == 2).copied();
    assert_eq!(
        e.map(|e| (e.num_computed, e.num_new_tokens, e.samples)),
        Some((4, 4, true))
    );
}

#[test]
fn a_request_that_can_never_fit_is_refused() {
    let mut s = scheduler(4, 16, 64, false); // 16 slots
    s.add(1, prompt(0, 17), Urgency::default());
    s.add(2, prompt(100, 4), Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(out.refused, vec![1]);
    assert!(out.scheduled.is_empty());
    assert!(s.seq(1).is_none());
    // The next one is not held up.
    assert_eq!(ids(&run_step(&mut s)), vec![2]);
    assert_eq!(s.blocks().num_used_blocks(), 1);
}

#[test]
fn a_waiting_request_waits_for_blocks_instead_of_preempting() {
    let mut s = scheduler(4, 16, 64, false);
    s.add(1, prompt(0, 12), Urgency::default());
    run_step(&mut s);
    s.add(2, prompt(100, 8), Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![1]);
    assert!(out.refused.is_empty() && out.preempted.is_empty());
    assert_eq!(s.num_waiting(), 1);
    s.finish(1);
    assert_eq!(ids(&run_step(&mut s)), vec![2]);
}

#[test]
fn max_num_seqs_is_respected() {
    let mut s = scheduler(64, 3, 64, false);
    for id in 1..=5 {
        s.add(id, prompt(10 * id as u32, 2), Urgency::default());
    }
    assert_eq!(ids(&run_step(&mut s)), vec![1, 2, 3]);
    assert_eq!(ids(&run_step(&mut s)), vec![1, 2, 3]);
    assert_eq!((s.num_running(), s.num_waiting()), (3, 2));
    s.finish(2);
    assert_eq!(ids(&run_step(&mut s)), vec![1, 3, 4]);
}

#[test]
fn admission_is_first_come_first_served_under_load() {
    let mut s = scheduler(64, 64, 10, false);
    for id in 1..=6 {
        s.add(id, prompt(10 * id as u32, 4), Urgency::default());
    }
    let mut admitted = Vec::new();
    for _ in 0..4 {
        for e in run_step(&mut s).scheduled {
            if e.num_computed == 0 && !admitted.contains(&e.id) {
                admitted.push(e.id);
            }
        }
    }
    assert_eq!(admitted, vec![1, 2, 3, 4, 5, 6]);
}

#[test]
fn a_fork_shares_the_prompt_and_runs_at_once() {
    let mut s = scheduler(16, 16, 64, false);
    s.add(1, prompt(0, 6), Urgency::default());
    let out = s.schedule();
    s.on_step_done(&out.scheduled);
    let used = s.blocks().num_used_blocks();
    assert!(s.fork(1, 2));
    assert_eq!(
        s.blocks().num_used_blocks(),
        used,
        "prompt blocks are shared"
    );
    s.append_token(1, 40);
    s.append_token(2, 41);
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(1, 1), (2, 1)]);
    // Both wrote into the shared, partly filled block: the child got a copy.
    assert_eq!(out.copies.len(), 1);
    assert_eq!(s.seq(2).map(|q| &q.tokens()[..6]), Some(&prompt(0, 6)[..]));
    assert!(!s.fork(99, 100));
}

#[test]
fn finishing_frees_every_block() {
    let mut s = scheduler(16, 16, 64, false);
    s.add(1, prompt(0, 9), Urgency::default());
    s.add(2, prompt(50, 3), Urgency::default());
    run_step(&mut s);
    assert!(s.blocks().num_used_blocks() > 0);
    s.finish(1);
    s.finish(2);
    assert_eq!(s.blocks().num_used_blocks(), 0);
    assert!(!s.has_work());
}

fn with_policy(
    num_blocks: usize,
    max_seqs: usize,
    budget: usize,
    policy: SchedulingPolicy,
) -> Scheduler {
    Scheduler::new(
        BlockManager::new(num_blocks, BLOCK, false),
        max_seqs,
        budget,
        policy,
    )
}

const BACKGROUND: Urgency = Urgency {
    background: true,
    priority: 0,
};

fn priority(p: i32) -> Urgency {
    Urgency {
        background: false,
        priority: p,
    }
}

#[test]
fn an_interactive_request_takes_a_slot_from_background_work_in_the_next_step() {
    let mut s = scheduler(64, 2, 64, false);
    s.add(1, prompt(0, 3), BACKGROUND);
    s.add(2, prompt(100, 3), BACKGROUND);
    s.add(3, prompt(200, 3), BACKGROUND);
    run_step(&mut s);
    assert_eq!(s.num_running(), 2);
    s.add(4, prompt(300, 3), Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(
        sizes(&out),
        vec![(4, 3), (1, 1)],
        "the interactive prompt runs first"
    );
    assert_eq!(
        out.preempted,
        vec![2],
        "the newest background sequence yields"
    );
    assert_eq!((s.num_running(), s.num_waiting()), (2, 2));
}

#[test]
fn an_interactive_request_gets_the_budget_before_a_background_prefill() {
    let mut s = scheduler(64, 8, 8, false);
    s.add(1, prompt(0, 40), BACKGROUND);
    assert_eq!(sizes(&run_step(&mut s)), vec![(1, 8)]);
    s.add(2, prompt(100, 5), Urgency::default());
    assert_eq!(sizes(&run_step(&mut s)), vec![(2, 5), (1, 3)]);
    // Decoding interactive work keeps coming first; the background prefill gets the rest.
    assert_eq!(sizes(&run_step(&mut s)), vec![(2, 1), (1, 7)]);
}

#[test]
fn an_interactive_request_preempts_background_work_for_blocks() {
    // 4 blocks of 4 tokens: the background sequence holds 3 of them.
    let mut s = scheduler(4, 8, 64, false);
    s.add(1, prompt(0, 12), BACKGROUND);
    run_step(&mut s);
    s.add(2, prompt(100, 8), Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![2]);
    assert_eq!(out.preempted, vec![1]);
    // Once the interactive request is done the background one is recomputed.
    s.finish(2);
    assert_eq!(sizes(&run_step(&mut s)), vec![(1, 13)]);
}

#[test]
fn background_work_never_preempts_interactive_work() {
    let mut s = scheduler(4, 8, 64, false);
    s.add(1, prompt(0, 12), Urgency::default());
    run_step(&mut s);
    s.add(2, prompt(100, 8), BACKGROUND);
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![1]);
    assert!(out.preempted.is_empty() && out.refused.is_empty());
    assert_eq!(s.num_waiting(), 1);
}

#[test]
fn fcfs_ignores_priority_values() {
    let mut s = with_policy(64, 1, 64, SchedulingPolicy::Fcfs);
    s.add(1, prompt(0, 3), priority(5));
    s.add(2, prompt(100, 3), priority(-5));
    assert_eq!(ids(&run_step(&mut s)), vec![1]);
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![1]);
    assert!(out.preempted.is_empty());
}

#[test]
fn the_priority_policy_admits_lower_values_first() {
    let mut s = with_policy(64, 1, 64, SchedulingPolicy::Priority);
    s.add(1, prompt(0, 3), priority(5));
    s.add(2, prompt(100, 3), priority(1));
    s.add(3, prompt(200, 3), priority(3));
    s.add(4, prompt(300, 3), priority(1));
    let mut order = Vec::new();
    while s.has_work() {
        let out = run_step(&mut s);
        for e in &out.scheduled {
            if e.num_computed == 0 {
                order.push(e.id);
            }
            s.finish(e.id);
        }
    }
    assert_eq!(order, vec![2, 4, 3, 1], "priority, then arrival");
}

#[test]
fn the_priority_policy_preempts_less_urgent_running_sequences() {
    let mut s = with_policy(4, 8, 64, SchedulingPolicy::Priority);
    s.add(1, prompt(0, 12), priority(10));
    run_step(&mut s);
    // Equal priority waits, as under FCFS.
    s.add(2, prompt(100, 8), priority(10));
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![1]);
    assert!(out.preempted.is_empty());
    // A more urgent one preempts the running sequence and starts at once.
    s.add(3, prompt(200, 8), priority(-1));
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![3]);
    assert_eq!(out.preempted, vec![1]);
    // Back to priority 10: the preempted sequence (earlier arrival) resumes before #2.
    s.finish(3);
    let out = run_step(&mut s);
    assert_eq!(ids(&out), vec![1]);
}

#[test]
fn under_the_priority_policy_a_running_sequence_preempts_the_least_urgent_first() {
    // 6 blocks; three sequences of one block each grow until blocks run out.
    let mut s = with_policy(6, 8, 64, SchedulingPolicy::Priority);
    s.add(1, prompt(0, 4), priority(9));
    s.add(2, prompt(100, 4), priority(0));
    s.add(3, prompt(200, 4), priority(5));
    run_step(&mut s);
    let mut preempted = Vec::new();
    for _ in 0..8 {
        preempted.extend(run_step(&mut s).preempted);
    }
    assert_eq!(preempted.first(), Some(&1), "priority 9 yields first");
    assert!(
        !preempted.contains(&2),
        "the most urgent sequence is never preempted"
    );
}

#[test]
fn background_work_gets_only_its_share_of_steps_that_run_interactive_work() {
    let mut s = scheduler(64, 16, 64, false).with_background_share(0.5);
    for id in 1..=4 {
        s.add(id, prompt(10 * id as u32, 3), BACKGROUND);
    }
    // Alone, background work uses the whole budget.
    assert_eq!(run_step(&mut s).num_tokens(), 12);
    // Half the interactive tokens: 3 beside a 5-token prompt, then at least 1 beside a decode.
    s.add(9, prompt(200, 5), Urgency::default());
    assert_eq!(
        sizes(&run_step(&mut s)),
        vec![(9, 5), (1, 1), (2, 1), (3, 1)]
    );
    assert_eq!(sizes(&run_step(&mut s)), vec![(9, 1), (1, 1)]);
    s.finish(9);
    // For a few steps the next interactive request is expected; then background work takes
    // everything again.
    for _ in 0..BACKGROUND_GRACE_STEPS {
        assert_eq!(run_step(&mut s).num_tokens(), 1);
    }
    assert_eq!(
        run_step(&mut s).num_tokens(),
        4,
        "all background work runs again"
    );
}

#[test]
fn prompt_logits_skip_cached_blocks_and_run_in_bounded_chunks() {
    let mut s = Scheduler::new(
        BlockManager::new(256, BLOCK, true),
        16,
        4096,
        SchedulingPolicy::Fcfs,
    );
    let long = prompt(0, PROMPT_LOGITS_CHUNK + 40);
    s.add(1, long.clone(), Urgency::default());
    run_step(&mut s);
    s.finish(1);
    let wants = SeqOptions {
        prompt_logits: true,
        ..SeqOptions::default()
    };
    s.add_with(2, long.clone(), wants.clone());
    // Nothing is read from the cache, and the prompt runs in two bounded chunks.
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(2, PROMPT_LOGITS_CHUNK)]);
    assert_eq!(out.scheduled[0].num_computed, 0);
    assert!(s.seq(2).is_some_and(|q| q.wants_prompt_logits()));
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(2, 40)]);
    assert!(out.scheduled[0].samples);
    // Decoding afterwards is not limited.
    assert_eq!(sizes(&run_step(&mut s)), vec![(2, 1)]);
}

#[test]
fn cache_salts_keep_prefix_hits_within_a_tenant() {
    let mut s = scheduler(64, 16, 64, true);
    let salted = |salt: &str| SeqOptions {
        cache: CacheScope {
            salt: Some(salt.into()),
            skip_reads: false,
        },
        ..SeqOptions::default()
    };
    s.add_with(1, prompt(0, 12), salted("a"));
    run_step(&mut s);
    s.finish(1);
    s.add_with(2, prompt(0, 12), salted("b"));
    assert_eq!(run_step(&mut s).scheduled[0].num_computed, 0);
    s.finish(2);
    s.add(3, prompt(0, 12), Urgency::default());
    assert_eq!(run_step(&mut s).scheduled[0].num_computed, 0);
    s.finish(3);
    s.add_with(4, prompt(0, 12), salted("a"));
    assert_eq!(run_step(&mut s).scheduled[0].num_computed, 8);
}

/// Under a sliding window every sequence holds about window / block + 1 blocks however long it
/// grows, so a cache far smaller than the context serves it without preemption.
#[test]
fn a_sliding_window_bounds_the_blocks_a_sequence_holds() {
    for prefix in [false, true] {
        // 8 blocks of 4 = 32 slots; the sequence grows to 100 tokens with a window of 8.
        let mut s = scheduler(8, 4, 64, prefix).with_sliding_window(8);
        s.add(1, prompt(0, 20), Urgency::default());
        let mut most = 0;
        for _ in 0..80 {
            let out = run_step(&mut s);
            assert_eq!(ids(&out), vec![1], "never preempted");
            most = most.max(s.blocks().num_used_blocks());
        }
        // Keys position-8 ..= position span at most 3 blocks, plus the one being written.
        assert!(most <= 4, "prefix {prefix}: {most} blocks held");
        s.finish(1);
        assert_eq!(s.blocks().num_used_blocks(), 0);
    }
    // Without the window the same sequence outgrows the cache.
    let mut s = scheduler(8, 4, 64, false);
    s.add(1, prompt(0, 20), Urgency::default());
    let outgrown = (0..80).any(|_| run_step(&mut s).scheduled.is_empty());
    assert!(outgrown, "the cache was big enough anyway");
}
