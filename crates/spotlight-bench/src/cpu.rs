//! CPU time of processes, from the OS: the process's CPU clock (`clock_getcpuclockid`,
//! nanoseconds, every thread live or exited), else `/proc/<pid>/stat` (user + system, in
//! 10 ms ticks).
//!
//! The tick count is too coarse for the P3 rounds: a slice of a few hundred CPU
//! milliseconds spread over four cloud processes read twice each could be off by several
//! per cent from rounding alone.

use std::time::Instant;

use nix::time::{ClockId, clock_getcpuclockid, clock_gettime};
use nix::unistd::Pid;

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`; 100 on Linux for every
/// architecture we build for).
const TICKS_PER_SECOND: f64 = 100.0;

/// User + system CPU seconds of process `pid` so far; `None` where the OS cannot say.
pub fn process_cpu_seconds(pid: u32) -> Option<f64> {
    precise_cpu_seconds(pid).or_else(|| ticked_cpu_seconds(pid))
}

/// The calling thread's CPU seconds so far (its CPU clock, in nanoseconds); NaN where the
/// OS cannot say.
pub fn thread_cpu_seconds() -> f64 {
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
        .unwrap_or(f64::NAN)
}

/// The process's CPU clock, in nanoseconds.
fn precise_cpu_seconds(pid: u32) -> Option<f64> {
    let pid = Pid::from_raw(i32::try_from(pid).ok()?);
    let clock: ClockId = clock_getcpuclockid(pid).ok()?;
    let t = clock_gettime(clock).ok()?;
    Some(t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
}

/// `/proc/<pid>/stat`'s user + system ticks.
fn ticked_cpu_seconds(pid: u32) -> Option<f64> {
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

    #[test]
    fn another_process_clock_is_precise_and_agrees_with_proc_stat() {
        // A child that spins in the shell, then idles until killed.
        let mut child = std::process::Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 30",
            ])
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        let t = Instant::now();
        let mut precise = 0.0;
        // Wait (bounded) until the child has spun for a while and then stopped spinning.
        while t.elapsed().as_secs() < 20 {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = precise_cpu_seconds(pid).expect("the child's CPU clock");
            if now > 0.05 && now == precise {
                break;
            }
            precise = now;
        }
        let ticked = ticked_cpu_seconds(pid).expect("/proc/<child>/stat");
        let _ = child.kill();
        let _ = child.wait();
        assert!(precise > 0.05, "child counted only {precise} s");
        // Both read the same accounting. /proc truncates user and system time to whole
        // 10 ms ticks separately, so its sum lies up to two ticks below the clock, never above.
        let behind = precise - ticked;
        assert!(
            (-0.001..0.021).contains(&behind),
            "clock {precise} s against /proc {ticked} s"
        );
        // Nanoseconds, not ticks: a reading that is not a whole number of 10 ms ticks.
        assert!(
            ((precise * 100.0) - (precise * 100.0).round()).abs() > 1e-6,
            "clock reading {precise} s looks tick-rounded"
        );
    }
}
