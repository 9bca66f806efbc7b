//! How much memory this machine (or container) has available, for sizing the default CPU KV
//! cache: `MemAvailable` from `/proc/meminfo`, lowered to what a cgroup v2 memory limit leaves
//! (`memory.max - memory.current`), since a container's limit is what kills the process. And
//! how the process allocator treats a step's large, short-lived buffers ([`tune_allocator`]).

/// Allocations up to this size come from the heap rather than fresh mappings.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap kept for the next step instead of returned at once.
const TRIM_THRESHOLD: i32 = 128 << 20;

/// Keep a step's large buffers (activations, logits rows, encoder outputs) in the heap. glibc
/// serves allocations from 128 KiB up with fresh `mmap`s and gives freed heap back at once, so
/// a step can page-fault its buffers in again: measured (issue 25, benches/RESULTS.md) +3–4 %
/// output tokens/s on the default model at concurrency 32, and a fifth of an encoder step
/// outside the server (the served encoder did not change). Up to 32 MiB comes from the heap and
/// up to 128 MiB of free heap is kept. Call once, at the start of the process; nothing happens
/// off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called before other threads run.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Bytes available to this process, if the system says.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let host = mem_available(&meminfo)?;
    Some(match cgroup_headroom() {
        Some(h) => host.min(h),
        None => host,
    })
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn mem_available(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What the cgroup v2 memory limit of this process leaves, if it has one.
fn cgroup_headroom() -> Option<u64> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = own.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
    headroom(&read("memory.max")?, &read("memory.current")?)
}

/// `memory.max - memory.current` (`None` when the limit is `max`, i.e. none).
fn headroom(max: &str, current: &str) -> Option<u64> {
    let max: u64 = max.trim().parse().ok()?;
    let current: u64 = current.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// The default CPU KV cache: `SHARE` of the available memory (within the bounds below), never
/// more than `needed` (what `max_num_seqs` sequences of `max_model_len` tokens can use), and
/// vLLM's 4 GiB when the system does not say what is available. Pages are touched only as
/// blocks are used, so a generous default costs nothing until the load needs it.
pub fn default_cpu_kv_bytes(available: Option<u64>, needed: u64) -> u64 {
    const FALLBACK: u64 = 4 << 30;
    const FLOOR: u64 = 256 << 20;
    const SHARE_PERCENT: u64 = 40;
    let share = match available {
        Some(a) => (a / 100 * SHARE_PERCENT).max(FLOOR),
        None => FALLBACK,
    };
    share.min(needed.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_meminfo_and_cgroup_limits() {
        let meminfo =
            "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(mem_available(meminfo), Some(20_000_000 * 1024));
        assert_eq!(mem_available("MemTotal: 1 kB\n"), None);
        assert_eq!(headroom("max\n", "123\n"), None);
        assert_eq!(headroom("1000\n", "300\n"), Some(700));
        assert_eq!(headroom("100\n", "300\n"), Some(0));
    }

    #[test]
    fn the_default_follows_the_machine_and_the_need() {
        let gib = 1u64 << 30;
        // A share of what is available...
        assert_eq!(
            default_cpu_kv_bytes(Some(20 * gib), u64::MAX),
            20 * gib / 100 * 40
        );
        // ...never more than the sequences can use, never under the floor...
        assert_eq!(default_cpu_kv_bytes(Some(20 * gib), gib), gib);
        assert_eq!(default_cpu_kv_bytes(Some(100 << 20), u64::MAX), 256 << 20);
        // ...and vLLM's 4 GiB when the system does not say.
        assert_eq!(default_cpu_kv_bytes(None, u64::MAX), 4 * gib);
        assert_eq!(default_cpu_kv_bytes(None, gib), gib);
    }
}
