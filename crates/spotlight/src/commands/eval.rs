//! `spotlight eval`: see `spotlight_bench::eval`.

use spotlight_bench::eval::{self, EvalOptions};

use super::{init_onnxruntime, load_model};
use crate::cli::EvalArgs;
use crate::settings::Settings;

pub fn run(settings: Settings, args: EvalArgs) -> anyhow::Result<()> {
    init_onnxruntime(&settings)?;
    let model = load_model(&settings)?;
    anyhow::ensure!(args.limit != Some(0), "--limit must be > 0");
    let opts = EvalOptions {
        dataset: args.dataset.clone(),
        limit: args.limit,
        progress: !args.no_progress,
    };
    let mut command = "spotlight eval".to_string();
    if let Some(n) = args.limit {
        command.push_str(&format!(" --limit {n}"));
    }
    command.push_str(&format!(" --out {}", args.out.display()));
    let report = eval::run(&model, &opts)?;
    for path in eval::write(&report, &args.out, &command)? {
        println!("wrote {}", path.display());
    }
    let png = report.png_bytes();
    match report.best_within(eval::MAX_LOSS_PT) {
        Some(best) => println!(
            "target met: {} + {}: {:.1} B per frame (PNG {:.1} B), {:+.2} pt against f32",
            best.codec, best.compression, best.wire_bytes, png, best.delta_pt
        ),
        None => println!(
            "target not met: no codec within {} pt of f32 at half the PNG's {png:.1} B",
            eval::MAX_LOSS_PT
        ),
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
