//! CPU time of processes, from the OS (`/proc/<pid>/stat`: user + system time of every
//! thread, live or exited).

use std::time::Instant;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`; 100 on Linux for every
/// architecture we build for).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of process `pid` so far; `None` where `/proc` cannot say.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after its closing paren are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the paren.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

/// CPU seconds of this process so far.
pub fn self_cpu_seconds() -> Option<f64> {
    process_cpu_seconds(std::process::id())
}

/// CPU seconds spent by a set of processes between `start` and `stop`.
#[derive(Debug, Clone)]
pub struct CpuMeter {
    pids: Vec<(String, u32)>,
    start: Vec<f64>,
    wall: Instant,
}

impl CpuMeter {
    /// Starts measuring `pids` (named, for the report).
    pub fn start(pids: Vec<(String, u32)>) -> Self {
        let start = pids
            .iter()
            .map(|(_, p)| process_cpu_seconds(*p).unwrap_or(f64::NAN))
            .collect();
        Self {
            pids,
            start,
            wall: Instant::now(),
        }
    }

    /// CPU seconds per process since `start`, and the wall seconds.
    pub fn stop(&self) -> (Vec<(String, f64)>, f64) {
        let wall = self.wall.elapsed().as_secs_f64();
        let cpu = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((name, pid), s)| {
                let now = process_cpu_seconds(*pid).unwrap_or(f64::NAN);
                (name.clone(), now - s)
            })
            .collect();
        (cpu, wall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_cpu_time_grows_with_work() {
        let before = self_cpu_seconds().expect("/proc/self/stat");
        let t = Instant::now();
        let mut x = 0u64;
        let mut spent = 0.0;
        // Spin until the OS has counted 0.15 s of CPU, within a generous wall deadline.
        while spent < 0.15 && t.elapsed().as_secs() < 20 {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            spent = self_cpu_seconds().expect("/proc/self/stat") - before;
        }
        assert!(
            spent >= 0.15,
            "only {spent} s of CPU counted in 20 s of spinning"
        );
    }
}
