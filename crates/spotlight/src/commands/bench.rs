//! `spotlight bench`: see `spotlight-bench`.

use anyhow::Context;
use spotlight_bench::BenchOptions;

use super::{init_onnxruntime, load_model};
use crate::cli::BenchArgs;
use crate::settings::Settings;

pub async fn run(settings: Settings, args: BenchArgs) -> anyhow::Result<()> {
    init_onnxruntime(&settings)?;
    let model = load_model(&settings)?;
    anyhow::ensure!(
        args.frames > 0 && args.latency_frames > 0,
        "--frames and --latency-frames must be > 0"
    );
    let opts = BenchOptions {
        exe: std::env::current_exe().context("locating the spotlight binary")?,
        dataset: args.dataset.clone(),
        frames: args.frames,
        latency_frames: args.latency_frames,
        quick: args.quick,
        only: args.only.clone(),
        markdown: args
            .markdown
            .clone()
            .unwrap_or_else(|| args.out.join("benchmarks.md")),
        out: args.out.clone(),
    };
    if let Some(seconds) = args.soak {
        anyhow::ensure!(
            seconds > 0 && args.streams > 0 && args.window > 0,
            "--soak, --streams and --window must be > 0"
        );
        let soak = spotlight_bench::soak::SoakOptions {
            duration: std::time::Duration::from_secs(seconds),
            streams: args.streams,
            window: args.window,
        };
        let report = spotlight_bench::soak::run(&opts, &soak, model).await?;
        std::fs::create_dir_all(&opts.out)
            .with_context(|| format!("creating {}", opts.out.display()))?;
        let path = opts.out.join("soak.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("{}", report.markdown());
        println!("wrote {}", path.display());
        return Ok(());
    }
    let mut command = format!(
        "spotlight bench --frames {} --latency-frames {}",
        args.frames, args.latency_frames
    );
    if settings.model != crate::settings::Settings::default().model {
        command.push_str(&format!(" --model {}", settings.model.display()));
    }
    if args.quick {
        command.push_str(" --quick");
    }
    if let Some(o) = &args.only {
        command.push_str(&format!(" --only \"{o}\""));
    }
    command.push_str(&format!(
        " --out {} --markdown {}",
        opts.out.display(),
        opts.markdown.display()
    ));
    let results = spotlight_bench::run(&opts, model).await?;
    for t in spotlight_bench::report::targets(&results) {
        println!(
            "{} {:<100} {:>10.3} {} (limit {}{:.3}) {}",
            t.id,
            t.what,
            t.measured,
            t.unit,
            if t.at_least { ">=" } else { "<=" },
            t.limit,
            if t.met() { "met" } else { "NOT MET" }
        );
    }
    for path in spotlight_bench::write_all(&results, &opts, &command)? {
        println!("wrote {}", path.display());
    }
    Ok(())
}
