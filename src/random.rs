//! Random bytes for ids, codes and nonces from the OS CSPRNG, fetched a block at a time.
//!
//! Owns: the per-thread block. A create needs a few small random values (the verification
//! id, the message id, a code and its nonce); fetching each with its own `getrandom` call costs
//! a system call apiece. Here one call fills a block that serves the next requests of that
//! thread. Every byte is handed out once and then zeroed, so no two callers see the same bytes.
//! Does not own: long-lived key material (`keys generate` asks the OS directly).

use std::cell::RefCell;

use ring::rand::{SecureRandom, SystemRandom};

/// Bytes fetched per system call: enough for a few dozen ids.
const BLOCK: usize = 512;

struct Pool {
    buf: [u8; BLOCK],
    /// Bytes before this offset have been handed out (and zeroed).
    used: usize,
}

thread_local! {
    static POOL: RefCell<Pool> = const {
        RefCell::new(Pool {
            buf: [0; BLOCK],
            used: BLOCK,
        })
    };
}

/// Fills `dest` with random bytes.
///
/// # Errors
/// The OS random source failed.
pub fn fill(dest: &mut [u8]) -> Result<(), ring::error::Unspecified> {
    if dest.len() > BLOCK {
        return SystemRandom::new().fill(dest);
    }
    POOL.with_borrow_mut(|pool| {
        if BLOCK - pool.used < dest.len() {
            SystemRandom::new().fill(&mut pool.buf)?;
            pool.used = 0;
        }
        let taken = &mut pool.buf[pool.used..pool.used + dest.len()];
        dest.copy_from_slice(taken);
        taken.fill(0);
        pool.used += dest.len();
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_draws_differ_across_block_boundaries() {
        // 40 draws of 16 bytes cross at least one refill of the 512-byte block.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40 {
            let mut b = [0u8; 16];
            fill(&mut b).unwrap();
            assert_ne!(b, [0u8; 16], "a draw returned zeroed (already used) bytes");
            assert!(seen.insert(b), "a draw repeated an earlier one");
        }
    }

    #[test]
    fn a_draw_larger_than_the_block_is_filled_whole() {
        let mut b = vec![0u8; BLOCK + 100];
        fill(&mut b).unwrap();
        // 100 zero bytes in a row at the end would mean the tail was never written.
        assert!(b[BLOCK..].iter().any(|&x| x != 0));
        assert!(b[..100].iter().any(|&x| x != 0));
    }

    #[test]
    fn handed_out_bytes_are_zeroed_in_the_pool() {
        let mut b = [0u8; 8];
        fill(&mut b).unwrap();
        POOL.with_borrow(|pool| {
            assert!(pool.used >= 8);
            assert!(pool.buf[..pool.used].iter().all(|&x| x == 0));
        });
    }
}
