//! How the controller process uses the C allocator.
//!
//! glibc gives threads that contend for the heap arenas of their own, up to eight per core,
//! and memory freed in one arena is not reused by another. The controller's heap is a few
//! tens of MiB, but a reconcile of a thousand groups allocates and frees that much again on
//! whichever runtime worker it lands; with an arena per worker the resident set ends up at
//! two to three times the heap. Two arenas keep it close to the heap at no measurable cost
//! in speed, since the async workers are few and rarely allocate at the same instant.

/// Arenas the controller allows glibc's allocator.
pub const MALLOC_ARENAS: i32 = 2;

/// Limits glibc's allocator to [`MALLOC_ARENAS`] arenas. Call it first thing in `main`,
/// before any thread is started; later it only constrains arenas not created yet. Returns
/// whether the allocator accepted the setting.
#[cfg(target_env = "gnu")]
pub fn limit_arenas() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it takes plain integers and is
    // safe to call at any time, and is called here before other threads exist.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) == 1 }
}

/// Other C libraries (musl) have no per-thread arenas to limit.
#[cfg(not(target_env = "gnu"))]
pub fn limit_arenas() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(target_env = "gnu")]
    fn glibc_accepts_the_arena_limit() {
        assert!(super::limit_arenas(), "mallopt(M_ARENA_MAX) refused");
    }
}
