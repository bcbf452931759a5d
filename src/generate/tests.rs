//! The sequence engine's tests: limits, rewinds, speculation and its pass costs.

use super::speculation::{Chances, PassCosts};
use super::*;
use crate::gguf::Gguf;
use crate::sample::SamplingParams;
use crate::synthetic::{Spec, write_file};

fn mini_qwen2() -> (tempfile::TempDir, Model) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mini.gguf");
    write_file(&Spec::mini("qwen2"), &path).expect("write");
    let model = Model::load(&Gguf::open(&path).expect("open")).expect("load");
    (dir, model)
}

fn greedy(model: &Model, prompt: &[u32], limits: Limits) -> Sequence {
    let state = model.new_state(256).expect("state");
    let sampler = Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() });
    Sequence::new(state, sampler, prompt.to_vec(), limits).expect("sequence")
}

/// Drives `seq` one token per pass until it ends; the tokens and why it ended.
fn run(model: &Model, seq: &mut Sequence) -> (Vec<u32>, FinishReason) {
    let mut tokens = Vec::new();
    loop {
        if let Some(reason) = seq.stop_reason().filter(|_| seq.generated() > 0) {
            return (tokens, reason);
        }
        let mut logits = seq.feed(model).expect("feed").expect("not interrupted");
        match seq.choose(&mut logits) {
            Choice::Token(t) => tokens.push(t),
            Choice::Done(reason) => return (tokens, reason),
        }
    }
}

#[test]
fn limits_end_a_sequence_in_order_and_end_of_generation_is_not_passed_on() {
    let (_dir, model) = mini_qwen2();
    let prompt = [3u32, 70, 71, 72];
    let limits =
        |n, eog: &[u32]| Limits { max_tokens: Some(n), end_of_generation: eog.to_vec(), ..Limits::default() };
    let (free, finish) = run(&model, &mut greedy(&model, &prompt, limits(6, &[])));
    assert_eq!((free.len(), finish), (6, FinishReason::Length));
    let (none, finish) = run(&model, &mut greedy(&model, &prompt, limits(0, &[])));
    assert_eq!((none.len(), finish), (0, FinishReason::Length));
    // The first token that differs from those before it made an end-of-generation token:
    // the sequence ends before it.
    let i = (1..free.len()).find(|&i| !free[..i].contains(&free[i])).expect("a second distinct token");
    let (cut, finish) = run(&model, &mut greedy(&model, &prompt, limits(6, &[free[i]])));
    assert_eq!((cut.as_slice(), finish), (&free[..i], FinishReason::Eos));
    let mut seq = greedy(&model, &prompt, limits(6, &[]));
    seq.limits.interrupted.store(true, Ordering::Relaxed);
    assert_eq!(seq.feed(&model).expect("feed"), None, "an interrupt stops the prompt's feed");
    assert_eq!(seq.stop_reason(), Some(FinishReason::Interrupted));
}

/// Proposals fed in one pass and rejected leave no trace: after a rewind the sequence
/// continues exactly as if they had never been fed.
#[test]
fn a_rewound_sequence_continues_as_if_the_rejected_tokens_were_never_fed() {
    let (_dir, model) = mini_qwen2();
    let prompt = [3u32, 70, 71, 72, 73];
    let limits = Limits { max_tokens: Some(8), ..Limits::default() };
    let (straight, _) = run(&model, &mut greedy(&model, &prompt, limits.clone()));
    let mut seq = greedy(&model, &prompt, limits);
    let mut logits = seq.feed(&model).expect("feed").expect("logits");
    assert_eq!(seq.choose(&mut logits), Choice::Token(straight[0]));
    // Three wrong tokens go in as if proposed, and are fed.
    seq.history.extend([90, 91, 92]);
    seq.generated += 3;
    seq.feed(&model).expect("feed");
    assert_eq!(seq.state().len(), prompt.len() + 4);
    seq.rewind(prompt.len() + 1).expect("rewind");
    // The first token's keys and values stay; the correction a verifying driver would take
    // from that token's row of the pass is the straight run's second token.
    assert_eq!((seq.state().len(), seq.generated(), seq.unfed()), (prompt.len() + 1, 1, &[][..]));
    seq.history.push(straight[1]);
    seq.generated += 1;
    let (rest, finish) = run(&model, &mut seq);
    assert_eq!(finish, FinishReason::Length);
    assert_eq!([&straight[..2], &rest[..]].concat(), straight);
}

/// Proposes what a list of tokens says should follow the history: the straight run's next
/// tokens, with those at the given positions of each proposal replaced by a wrong one.
struct Oracle {
    prompt_len: usize,
    straight: Vec<u32>,
    wrong_at: Option<usize>,
}

impl crate::speculate::Propose for Oracle {
    fn propose(&mut self, history: &[u32], max: usize) -> Result<Vec<u32>> {
        let done = history.len() - self.prompt_len;
        let mut next: Vec<u32> = self.straight.iter().skip(done).take(max).copied().collect();
        if let Some(j) = self.wrong_at
            && !next.is_empty()
        {
            let j = j.min(next.len() - 1);
            next[j] = next[j].wrapping_add(1) % 100;
        }
        Ok(next)
    }

    fn feedback(&mut self, _: usize, _: usize) {}
}

/// Speculative decoding changes nothing but the speed: the same tokens and the same end
/// with proposals all right, rejected at every position, or all wrong, and the KV cache
/// rolled back each time (a wrong key or value would change every later token).
#[test]
fn speculation_gives_the_tokens_of_plain_decoding_whatever_is_accepted() {
    let (_dir, model) = mini_qwen2();
    let prompt = vec![3u32, 70, 71, 72, 73];
    let limits = Limits { max_tokens: Some(20), ..Limits::default() };
    let (straight, finish) = run(&model, &mut greedy(&model, &prompt, limits.clone()));
    assert_eq!(finish, FinishReason::Length);
    let sampler = || Sampler::new(SamplingParams { temperature: 0.0, ..SamplingParams::default() });
    for wrong_at in [None, Some(0), Some(1), Some(2), Some(3), Some(4)] {
        let oracle = Oracle { prompt_len: prompt.len(), straight: straight.clone(), wrong_at };
        let state = model.new_state(256).expect("state");
        let generator = Generator::new(&model, state, sampler(), prompt.clone(), limits.clone())
            .expect("generator")
            .with_speculation(Box::new(oracle), 5, false);
        let mut tokens = Vec::new();
        let mut end = None;
        let mut generator = generator;
        for step in generator.by_ref() {
            match step.expect("step") {
                Step::Token(t) => tokens.push(t),
                Step::Done(g) => end = Some(g.finish),
                Step::Prefilled => {}
            }
        }
        assert_eq!(tokens, straight, "wrong at {wrong_at:?}");
        assert_eq!(end, Some(FinishReason::Length));
        let counts = generator.speculation_counts().expect("speculated");
        assert!(counts.proposed > 0);
        match wrong_at {
            None => assert_eq!(counts.accepted, counts.proposed, "all right, all accepted"),
            Some(j) => assert!(counts.accepted < counts.proposed, "wrong at {j}: {counts:?}"),
        }
    }
    // Every position of a pass of five proposals rejected, driven directly.
    for j in 0..5 {
        let mut seq = greedy(&model, &prompt, limits.clone());
        let mut logits = seq.feed(&model).expect("feed").expect("logits");
        assert_eq!(seq.choose(&mut logits), Choice::Token(straight[0]));
        let mut proposals = straight[1..6].to_vec();
        proposals[j] = proposals[j].wrapping_add(1) % 100;
        let (choices, accepted) = seq.speculate(&model, &proposals).expect("pass").expect("not interrupted");
        assert_eq!(accepted, j);
        let want: Vec<Choice> = straight[1..j + 2].iter().map(|&t| Choice::Token(t)).collect();
        assert_eq!(choices, want, "wrong at {j}");
        assert_eq!(seq.state().len(), prompt.len() + j + 1, "the state keeps what was accepted");
        let (rest, _) = run(&model, &mut seq);
        assert_eq!([&straight[..j + 2], &rest[..]].concat(), straight, "wrong at {j}");
    }
    // With sampling, nothing is proposed unless asked (a seed's draws would change).
    let oracle = Oracle { prompt_len: prompt.len(), straight: straight.clone(), wrong_at: None };
    let sampled = Sampler::new(SamplingParams { temperature: 0.8, ..SamplingParams::default() });
    let generator = Generator::new(&model, model.new_state(256).expect("state"), sampled, prompt, limits)
        .expect("generator")
        .with_speculation(Box::new(oracle), 5, false);
    assert_eq!(generator.speculation_counts(), None);
}

/// With sampling, a verification pass gives each token the distribution plain decoding gives
/// it: the token from the pass's first row follows the model's probabilities whatever was
/// proposed for it, and so does the token after an accepted proposal (chi-square tests over
/// 3,000 seeded runs on the mini model; deterministic, and they fail when the rule is
/// broken: accepting every proposal, say, puts all the first row's draws on one token).
#[test]
fn speculative_sampling_keeps_the_model_distribution() {
    use crate::sample::tests::{chi_square, softmax};
    let (_dir, model) = mini_qwen2();
    let prompt = vec![3u32, 70, 71, 72, 73];
    let first = 80u32;
    let temperature = 0.6;
    let probs = |tokens: &[u32]| {
        let mut state = model.new_state(64).expect("state");
        softmax(&prefill(&model, &mut state, tokens).expect("prefill"), temperature)
    };
    let most_likely =
        |p: &[f64]| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).expect("a token") as u32;
    let p2 = probs(&[&prompt[..], &[first]].concat());
    let x = most_likely(&p2);
    let p3 = probs(&[&prompt[..], &[first, x]].concat());
    let y = most_likely(&p3);
    let params =
        SamplingParams { temperature, top_k: 0, top_p: 1.0, min_p: 0.0, ..SamplingParams::default() };
    let (mut second, mut third) = (vec![0; p2.len()], vec![0; p3.len()]);
    for seed in 0..3_000 {
        let sampler = Sampler::new(SamplingParams { seed, ..params.clone() });
        let limits = Limits { max_tokens: Some(10), ..Limits::default() };
        let mut seq = Sequence::new(model.new_state(64).expect("state"), sampler, prompt.clone(), limits)
            .expect("sequence");
        seq.feed(&model).expect("feed").expect("logits");
        seq.history.push(first);
        seq.generated += 1;
        let (choices, accepted) = seq.speculate(&model, &[x, y]).expect("pass").expect("not interrupted");
        let Choice::Token(t2) = choices[0] else { panic!("{choices:?}") };
        second[t2 as usize] += 1;
        assert_eq!(accepted > 0, t2 == x, "accepted exactly when chosen");
        if t2 == x {
            let Choice::Token(t3) = choices[1] else { panic!("{choices:?}") };
            third[t3 as usize] += 1;
        }
    }
    let (chi, limit) = chi_square(&second, &p2);
    assert!(chi < limit, "the first row: chi-square {chi:.1} over {limit:.1}");
    let (chi, limit) = chi_square(&third, &p3);
    assert!(chi < limit, "after an accepted proposal: chi-square {chi:.1} over {limit:.1}");
    assert!(
        third.iter().sum::<usize>() > 300,
        "enough accepted proposals to test: {}",
        third.iter().sum::<usize>()
    );
}

#[test]
fn a_pass_checks_as_many_proposals_as_pay_for_themselves() {
    let mut c = PassCosts::new(8, 1);
    assert_eq!(c.best(0, 8), 0, "one plain step is measured first");
    c.record(1, 1.0);
    // Cheap extra rows and proposals mostly accepted: all of them.
    for rows in 2..=8 {
        c.record(rows, 1.0 + 0.01 * rows as f64);
    }
    c.accept[0] = Chances { first: 0.9, next: 0.9 };
    assert_eq!(c.best(0, 7), 7);
    assert_eq!(c.best(0, 3), 3, "at most what is offered");
    // Each row costing most of a step: one or two.
    for rows in 2..=8 {
        c.seconds[rows] = None;
        c.record(rows, 0.3 + 0.7 * rows as f64);
    }
    assert!((1..=2).contains(&c.best(0, 7)), "{}", c.best(0, 7));
    // Proposals never accepted: none, until the estimate has drifted back.
    for rows in 2..=8 {
        c.seconds[rows] = Some(1.0 + 0.01 * rows as f64);
    }
    for _ in 0..40 {
        c.record_acceptance(0, 4, 0);
    }
    assert_eq!(c.best(0, 7), 0);
    assert!((0..200).any(|_| c.best(0, 7) > 0), "never tried again");
}

#[test]
fn pass_sizes_not_measured_are_tried_and_a_short_proposal_must_pay() {
    let mut c = PassCosts::new(8, 1);
    assert!(!c.pays(0, 3), "nothing pays before one plain step is measured");
    c.record(1, 1.0);
    // Not measured: a step and a tenth of one per row more, whatever was measured beside it.
    assert!((c.cost(8, 1.0) - 1.7).abs() < 1e-9);
    c.record(5, 2.3);
    assert!((c.cost(8, 1.0) - 1.7).abs() < 1e-9);
    assert!((c.cost(5, 1.0) - 2.3).abs() < 1e-9);
    // Where a pass of 2 to 8 rows costs about the same, a few proposals do not pay for it
    // and many do.
    for rows in 2..=8 {
        c.seconds[rows] = Some(2.3);
    }
    c.accept[0] = Chances { first: 0.7, next: 0.7 };
    assert!(!c.pays(0, 1) && !c.pays(0, 2), "one or two proposals in a 2.3-step pass");
    assert!(c.pays(0, 7));
    assert!(!c.pays(0, 0) && !c.pays(0, 8), "none, or more rows than a pass takes");
    c.accept[0] = Chances { first: 0.2, next: 0.2 };
    assert!(!c.pays(0, 7));
    // A copy whose first token is often refused but which goes on once it starts: many.
    c.accept[0] = Chances { first: 0.3, next: 0.95 };
    assert!(c.pays(0, 7) && !c.pays(0, 2));
    assert_eq!(c.best(0, 7), 7);
    // A first proposal refused says nothing about the ones after it.
    c.record_acceptance(0, 7, 0);
    assert!((c.accept[0].first - 0.24).abs() < 1e-9 && c.accept[0].next == 0.95);
    c.record_acceptance(0, 7, 3);
    assert!((c.accept[0].next - (0.8 * 0.95 + 0.2 * 2.0 / 3.0)).abs() < 1e-9);
    // One proposal at a time, accepted: the chance of more rises, so more are tried.
    c.accept[0] = Chances { first: 0.95, next: 0.2 };
    assert_eq!(c.best(0, 7), 0);
    for _ in 0..10 {
        c.record_acceptance(0, 1, 1);
    }
    assert!(c.accept[0].next > 0.85 && c.best(0, 7) == 7, "{:?}", c.accept[0]);
}
