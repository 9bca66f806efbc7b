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

/// One engine step without a model: schedule, then hand `update_from_output` a made-up token
/// for every sequence that sampled (forked choices included).
fn run_step(s: &mut Scheduler) -> SchedulerOutput {
    let out = s.schedule();
    let sampled = out
        .scheduled
        .iter()
        .filter(|e| e.samples)
        .map(|e| e.id)
        .chain(out.forked.iter().map(|&(_, child)| child))
        .map(|id| sampled(id, &[7]))
        .collect();
    s.update_from_output(
        &out,
        &RunnerOutput {
            sampled,
            ..RunnerOutput::default()
        },
    );
    s.blocks().check_invariants().expect("block bookkeeping");
    out
}

/// A runner result: `tokens` sampled for sequence `id`, no drafts.
fn sampled(id: SeqId, tokens: &[u32]) -> SampledSeq {
    SampledSeq {
        id,
        tokens: tokens.to_vec(),
        ..SampledSeq::default()
    }
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
            samples: true,
            num_draft: 0,
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
            samples: true,
            num_draft: 0,
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
    let options = SeqOptions {
        children: vec![2],
        ..SeqOptions::default()
    };
    s.add_with(1, prompt(0, 6), options);
    let out = s.schedule();
    assert_eq!(
        out.forked,
        vec![(1, 2)],
        "forked in the step that computes the prompt"
    );
    assert_eq!(
        ids(&out),
        vec![1],
        "the child samples from its parent's row"
    );
    let used = s.blocks().num_used_blocks();
    assert_eq!(used, 2, "prompt blocks are shared");
    let update = RunnerOutput {
        sampled: vec![sampled(1, &[40]), sampled(2, &[41])],
        ..RunnerOutput::default()
    };
    s.update_from_output(&out, &update);
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(1, 1), (2, 1)]);
    // Both wrote into the shared, partly filled block: the child got a copy.
    assert_eq!(out.copies.len(), 1);
    assert_eq!(s.seq(2).map(|q| &q.tokens()[..6]), Some(&prompt(0, 6)[..]));
    assert_eq!(s.seq(2).map(|q| q.tokens()[6]), Some(41));
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

/// A runner result with drafts: `tokens` kept, `accepted` of `num_draft` drafts accepted, and
/// `next` proposed for the following step.
fn verified(
    id: SeqId,
    tokens: &[u32],
    num_draft: usize,
    accepted: usize,
    next: &[u32],
) -> SampledSeq {
    SampledSeq {
        id,
        tokens: tokens.to_vec(),
        num_draft,
        num_accepted: accepted,
        next_draft: next.to_vec(),
        ..SampledSeq::default()
    }
}

fn update(s: &mut Scheduler, out: &SchedulerOutput, sampled: Vec<SampledSeq>) -> Vec<SeqUpdate> {
    let updates = s.update_from_output(
        out,
        &RunnerOutput {
            sampled,
            ..RunnerOutput::default()
        },
    );
    s.blocks().check_invariants().expect("block bookkeeping");
    updates
}

#[test]
fn drafts_are_scheduled_after_the_last_token_and_rejected_ones_roll_back() {
    let mut s = scheduler(32, 16, 64, true);
    s.add(1, prompt(0, 6), Urgency::default());
    let out = s.schedule();
    update(&mut s, &out, vec![verified(1, &[50], 0, 0, &[51, 52, 53])]);
    // Token 50 is due, then three drafts: 4 positions, the last three drafts.
    let out = s.schedule();
    assert_eq!(
        out.scheduled,
        vec![ScheduledSeq {
            id: 1,
            num_new_tokens: 4,
            num_computed: 6,
            samples: true,
            num_draft: 3,
        }]
    );
    assert_eq!(s.seq(1).map(|q| q.draft().to_vec()), Some(vec![51, 52, 53]));
    // 51 accepted, 52 rejected (the target said 60): 50 and 51 are computed, 60 is due.
    let updates = update(&mut s, &out, vec![verified(1, &[51, 60], 3, 1, &[])]);
    assert_eq!(updates[0].tokens, vec![51, 60]);
    let q = s.seq(1).expect("running");
    assert_eq!(q.tokens()[6..], [50, 51, 60]);
    assert_eq!(q.num_computed(), 8);
    assert!(q.draft().is_empty());
    // Positions 8 and 9 held drafts 52 and 53: none of that reached the prefix cache. The
    // block of positions 4..8 is full with accepted tokens and is registered.
    let out = run_step(&mut s);
    assert_eq!(sizes(&out), vec![(1, 1)]);
    assert_eq!(s.seq(1).map(|q| q.num_computed()), Some(9));
    s.finish(1);
    let mut again = prompt(0, 6);
    again.extend([50, 51, 60, 7, 99]);
    s.add(2, again, Urgency::default());
    let out = run_step(&mut s);
    assert_eq!(
        out.scheduled[0].num_computed, 8,
        "two full blocks of accepted tokens are cached, nothing of the drafts"
    );
}

#[test]
fn drafts_are_cut_to_the_budget_and_to_max_tokens() {
    let mut s = scheduler(32, 16, 3, false);
    let options = SeqOptions {
        stops: crate::token_stop::TokenStops {
            max_tokens: 5,
            ..Default::default()
        },
        ..SeqOptions::default()
    };
    s.add_with(1, prompt(0, 3), options);
    let out = s.schedule();
    update(
        &mut s,
        &out,
        vec![verified(1, &[9], 0, 0, &[1, 2, 3, 4, 5])],
    );
    // Budget 3: the due token and two drafts.
    let out = s.schedule();
    assert_eq!(
        (out.scheduled[0].num_new_tokens, out.scheduled[0].num_draft),
        (3, 2)
    );
    update(
        &mut s,
        &out,
        vec![verified(1, &[1, 2, 8], 2, 2, &[1, 2, 3])],
    );
    // Five outputs allowed, four made: the last one leaves no room for a draft.
    let out = s.schedule();
    assert_eq!(
        (out.scheduled[0].num_new_tokens, out.scheduled[0].num_draft),
        (1, 0)
    );
    let updates = update(&mut s, &out, vec![verified(1, &[4], 0, 0, &[])]);
    assert_eq!(updates[0].stopped, Some(Stopped::Length));
    assert!(s.seq(1).is_none(), "finished and freed");
    assert_eq!(s.blocks().num_used_blocks(), 0);
}

#[test]
fn a_stop_inside_the_accepted_tokens_cuts_the_rest() {
    let mut s = scheduler(32, 16, 64, false).with_stop_limits(vec![2], 1000);
    s.add(1, prompt(10, 4), Urgency::default());
    let out = s.schedule();
    update(&mut s, &out, vec![verified(1, &[20], 0, 0, &[21, 2, 23])]);
    let out = s.schedule();
    let updates = update(&mut s, &out, vec![verified(1, &[21, 2, 23, 24], 3, 3, &[])]);
    assert_eq!(updates[0].tokens, vec![21, 2]);
    assert_eq!(updates[0].stopped, Some(Stopped::Token(None)));
    assert!(s.seq(1).is_none());
}

#[test]
fn preemption_drops_drafts_and_recomputes_only_accepted_tokens() {
    // 4 blocks of 4: two sequences of 7 tokens plus drafts cannot both grow.
    let mut s = scheduler(4, 16, 64, false);
    s.add(1, prompt(0, 6), Urgency::default());
    s.add(2, prompt(100, 6), Urgency::default());
    let out = s.schedule();
    update(
        &mut s,
        &out,
        vec![
            verified(1, &[7], 0, 0, &[8, 9]),
            verified(2, &[7], 0, 0, &[8, 9]),
        ],
    );
    // Sequence 1 takes 3 positions (6..9) into a third block; sequence 2, the newest, is
    // preempted for lack of blocks and loses its drafts.
    let out = s.schedule();
    assert_eq!(sizes(&out), vec![(1, 3)]);
    assert_eq!(out.preempted, vec![2]);
    assert!(s
        .seq(2)
        .is_some_and(|q| q.draft().is_empty() && q.num_computed() == 0));
    update(&mut s, &out, vec![verified(1, &[8, 5], 2, 1, &[])]);
    s.finish(1);
    // Readmitted, it recomputes prompt and its one output token, then samples.
    let out = s.schedule();
    assert_eq!(sizes(&out), vec![(2, 7)]);
    assert_eq!(out.scheduled[0].num_draft, 0);
}

#[test]
fn verification_ending_on_an_accepted_draft_leaves_a_token_to_compute() {
    // The runner stops verifying at a stop id (here before `min_tokens`, so the scheduler does
    // not end the sequence): every kept token was a draft, none was sampled past them.
    let mut s = scheduler(32, 16, 64, false);
    let options = SeqOptions {
        stops: crate::token_stop::TokenStops {
            min_tokens: 10,
            stop_token_ids: vec![22],
            ..Default::default()
        },
        ..SeqOptions::default()
    };
    s.add_with(1, prompt(0, 4), options);
    let out = s.schedule();
    update(&mut s, &out, vec![verified(1, &[20], 0, 0, &[21, 22, 23])]);
    let out = s.schedule();
    assert_eq!(out.scheduled[0].num_draft, 3);
    let updates = update(&mut s, &out, vec![verified(1, &[21, 22], 3, 2, &[])]);
    assert_eq!(updates[0].stopped, None);
    let q = s.seq(1).expect("goes on");
    assert_eq!((q.tokens().len(), q.num_computed()), (7, 6));
    // The last kept draft is computed again, and the sequence samples next.
    let out = s.schedule();
    assert_eq!(sizes(&out), vec![(1, 1)]);
    assert!(out.scheduled[0].samples);
}
