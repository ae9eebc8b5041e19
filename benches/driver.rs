//! What both benchmarks share: every contender runs in its own process (a
//! global allocator, or a collector's thread-local state, is one per
//! process), the repetitions of all contenders are interleaved so a noisy
//! neighbour on a shared machine skews no one in particular, and each
//! figure's minimum is kept.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Instant;

/// Each contender's best (minimum) value of every figure.
pub struct Best {
    /// `per_contender[c][figure]`.
    pub per_contender: Vec<BTreeMap<String, f64>>,
    /// The figures, in the order the children print them.
    pub figures: Vec<String>,
    /// Repetitions run.
    pub reps: usize,
}

impl Best {
    /// Prints the Markdown table: `caption`, then a row per figure with
    /// each contender's best and the `ratio_names` columns, which `ratios`
    /// computes from a figure's value for each contender.
    pub fn print_table(
        &self,
        contenders: &[&str],
        caption: &str,
        ratio_names: &[&str],
        ratios: impl Fn(&dyn Fn(usize) -> f64) -> Vec<String>,
    ) {
        println!("\n{caption}\n");
        print!("| workload |");
        for name in contenders.iter().chain(ratio_names) {
            print!(" {name} |");
        }
        println!(
            "\n|---|{}",
            "---|".repeat(contenders.len() + ratio_names.len())
        );
        for figure in &self.figures {
            print!("| {figure} |");
            for c in &self.per_contender {
                print!(" {:.1} |", c[figure]);
            }
            let value = |c: usize| self.per_contender[c][figure];
            for ratio in ratios(&value) {
                print!(" {ratio} |");
            }
            println!();
        }
    }
}

/// A benchmark's `main`: in a child, runs `child` for its contender; in the
/// parent, runs every contender and hands the results to `report`.
pub fn main(contenders: &[&str], child: fn(usize), report: fn(&Best)) {
    match contender() {
        Some(contender) => child(contender),
        None => report(&run_interleaved(contenders)),
    }
}

/// The contender this process runs, when it is a child (`--contender N`).
fn contender() -> Option<usize> {
    let mut args = std::env::args().skip_while(|a| a != "--contender");
    args.nth(1).map(|n| n.parse().expect("contender number"))
}

/// Runs each contender (first number on the command line: repetitions,
/// default 5) as a child of this executable, which prints one
/// `figure\tvalue` line per figure. The child also gets its number in
/// `BENCH_CONTENDER`, for a global allocator that must choose before `main`.
fn run_interleaved(contenders: &[&str]) -> Best {
    let reps = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(5);
    let exe = std::env::current_exe().expect("own path");
    let mut best = Best {
        per_contender: vec![BTreeMap::new(); contenders.len()],
        figures: Vec::new(),
        reps,
    };
    for rep in 0..reps {
        for (c, name) in contenders.iter().enumerate() {
            let out = Command::new(&exe)
                .args(["--contender", &c.to_string()])
                .env("BENCH_CONTENDER", c.to_string())
                .output()
                .expect("run a contender");
            assert!(
                out.status.success(),
                "{name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            for line in String::from_utf8(out.stdout).expect("utf-8").lines() {
                let (figure, value) = line.split_once('\t').expect("figure\\tvalue");
                let value: f64 = value.parse().expect("a number");
                if !best.figures.iter().any(|f| f == figure) {
                    best.figures.push(figure.to_string());
                }
                let slot = best.per_contender[c]
                    .entry(figure.to_string())
                    .or_insert(value);
                *slot = slot.min(value);
            }
        }
        eprintln!("repetition {} of {reps} done", rep + 1);
    }
    best
}

/// ns per item of `work`, which returns how many items it handled.
pub fn time(work: impl FnOnce() -> usize) -> f64 {
    let start = Instant::now();
    let items = work();
    start.elapsed().as_nanos() as f64 / items as f64
}
