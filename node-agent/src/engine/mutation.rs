//! Deliberate protocol bugs, to prove that the simulation's checker catches them.
//!
//! The enum always exists so the engine's hooks read the same in every build, but a
//! mutation can only be installed through `Engine::set_mutation`, which is compiled only
//! with the `sim-mutations` feature. Only the test crate enables that feature (as a
//! dev-dependency feature), so no product build and no configuration can reach a mutation.

/// A rule of the protocol switched off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mutation {
    #[default]
    None,
    /// A candidate whose peer is silent acts as if the witness had granted it a lease,
    /// without asking.
    PromoteWithoutWitness,
    /// A node never fences itself when its lease runs out, and arms no watchdog.
    NoSelfFence,
    /// A candidate does not wait out the lease it granted the peer.
    IgnorePromise,
    /// A step's first passing health check never reaches the failover's timeline.
    ForgetFirstHealthy,
}
