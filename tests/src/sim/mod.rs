//! The seeded simulation of the failover protocol.
//!
//! Two real engines (`hapair_agent::engine`) and the real witness
//! (`hapair_operator::witness`) run on a simulated network and clock ([`world`]). A
//! schedule is fully determined by its seed ([`params`]): timing, links, witness mode,
//! clock rates, and the faults injected during its chaos phase (crashes and restarts,
//! long stalls, partitions of each link and of the witness path, loss, duplication,
//! delay and reordering, witness crashes, resyncing replicas, failing monitors, admin
//! actions, and, on replicated controllers, moves of the witness's leadership).
//!
//! Checked at every step, against true simulated time:
//!
//! - **safety**: never two nodes holding resources (VIP, flow, primary volume) at once —
//!   except, in witness mode `none`, an overlap started by a node that had heard nothing
//!   from its peer for `deadAfter` (the documented risk of two-node mode);
//! - **epochs**: no node's epoch ever decreases (across restarts too), and with a witness
//!   every term starts in an epoch above the previous term's;
//! - **data**: a node whose replica is not UpToDate never starts serving unless an admin
//!   forced it;
//! - **contract**: the engine never has two operations outstanding on one step;
//!
//! and, after the chaos, **liveness** (everything healed: exactly one primary within a
//! bounded time), **bounded failover** (the primary crashes, the standby serves within
//! [`params::Params::failover_bound`], plus [`params::Params::takeover_extension`] when the
//! witness's leadership moves at the crash or during the failover) and, in schedules whose
//! checked step passes its first health check right after each start, the failover's
//! **timeline** (that pass is on it, no earlier than the step's start, and every phase is
//! in order).
//!
//! A failing schedule is reproduced exactly by its seed: [`run_seed`] with tracing on
//! prints everything that happened.

pub mod clock;
pub mod params;
pub mod world;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

pub use params::{AGGRESSIVE_TIMINGS, DEFAULT_TIMINGS, FailoverChange, Leaders, Params, Timings};
pub use world::{Failure, Options, Outcome, Stats, TakeoverMutation, World};

/// The parameters of schedule `seed`.
pub fn schedule(seed: u64) -> Params {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Params::random(seed, &mut rng)
}

/// Runs schedule `seed`.
pub fn run_seed(seed: u64, options: Options) -> Result<Outcome, Failure> {
    World::new(schedule(seed), options).run()
}

/// The command that reruns one seed with its trace printed.
pub fn replay_command(seed: u64) -> String {
    format!("HAPAIR_SIM_SEED={seed} cargo test -p hapair-tests --test simulation replay -- --nocapture")
}
