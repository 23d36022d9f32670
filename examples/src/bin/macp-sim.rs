//! `macp-sim`: runs the deterministic simulator over a range of seeds.
//!
//! ```text
//! macp-sim --seeds 0..10000            # the large run (use --release)
//! macp-sim --seed 42 --trace           # replay one seed, every event on stderr
//! options: --jobs N  --storage fs|memory  --crash-rate P  --sync-faults P  --sessions A..B
//! ```
//!
//! Exits 0 when every seed passes, 1 at the first failing seed (after one
//! line naming the seed, the invariant and the reproduction command), 2 on
//! bad arguments.

use std::process::ExitCode;
use std::time::Instant;

use macp_examples::sim::{run_seed, Backend, Failure, SimConfig, Stats};

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once("..")?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("macp-sim: {msg}");
    eprintln!(
        "usage: macp-sim [--seeds A..B | --seed N] [--jobs N] [--trace] [--storage fs|memory] \
         [--crash-rate P] [--sync-faults P] [--sessions A..B]"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut seeds = (0u64, 100u64);
    let mut jobs = 1usize;
    let mut cfg = SimConfig::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_default();
        match a.as_str() {
            "--seeds" => match parse_range(&value()) {
                Some(r) if r.0 < r.1 => seeds = r,
                _ => return usage("--seeds takes A..B with A < B"),
            },
            "--seed" => match value().parse::<u64>() {
                Ok(n) if n < u64::MAX => seeds = (n, n + 1),
                _ => return usage("--seed takes a number"),
            },
            "--jobs" => match value().parse::<usize>() {
                Ok(n) if n > 0 => jobs = n,
                _ => return usage("--jobs takes a positive number"),
            },
            "--trace" => cfg.trace = true,
            "--storage" => match Backend::parse(&value()) {
                Some(b) => cfg.backend = b,
                None => return usage("--storage takes: fs, memory"),
            },
            "--crash-rate" => match value().parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => cfg.crash_rate = p,
                _ => return usage("--crash-rate takes a probability"),
            },
            "--sync-faults" => match value().parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => cfg.faults.sync = p,
                _ => return usage("--sync-faults takes a probability"),
            },
            "--sessions" => match parse_range(&value()) {
                Some(r) if r.0 <= r.1 && r.1 > 0 => cfg.sessions = r,
                _ => return usage("--sessions takes A..B with A <= B"),
            },
            "-h" | "--help" => return usage("help"),
            other => return usage(&format!("unknown argument {other}")),
        }
    }

    let started = Instant::now();
    let (lo, hi) = seeds;
    let jobs = jobs.min((hi - lo) as usize).max(1);
    // Seeds are split round-robin over threads; each seed is independent
    // and deterministic, so the split changes nothing but the wall time.
    let results: Vec<Result<Stats, Failure>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..jobs as u64)
            .map(|j| {
                let cfg = &cfg;
                scope.spawn(move || {
                    let mut total = Stats::default();
                    let mut seed = lo + j;
                    while seed < hi {
                        total += &run_seed(seed, cfg)?;
                        seed += jobs as u64;
                    }
                    Ok(total)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a simulator thread panicked")).collect()
    });
    let mut total = Stats::default();
    let mut failures: Vec<Failure> = Vec::new();
    for r in results {
        match r {
            Ok(s) => total += &s,
            Err(f) => failures.push(f),
        }
    }
    let elapsed = started.elapsed();
    if let Some(f) = failures.iter().min_by_key(|f| f.seed) {
        println!("{f}");
        return ExitCode::from(1);
    }
    println!(
        "macp-sim: {} seeds ({lo}..{hi}) passed in {:.1} s, storage {}",
        total.seeds,
        elapsed.as_secs_f64(),
        cfg.backend.name()
    );
    println!("{total}");
    ExitCode::SUCCESS
}
