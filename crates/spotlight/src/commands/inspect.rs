//! `spotlight inspect`: the segment tree, and what a task keeps and excludes.

use anyhow::Context;
use spotlight_model::{Model, TaskSpec};

use crate::cli::{InspectArgs, parse_gains, split_list};
use crate::settings::Settings;

pub fn run(settings: Settings, args: InspectArgs) -> anyhow::Result<()> {
    let dir = args.dir.clone().unwrap_or_else(|| settings.model_dir());
    let model =
        Model::load(&dir).with_context(|| format!("loading model package {}", dir.display()))?;
    print!("{}", render(&model));
    if args.categories.is_some() || !args.gains.is_empty() {
        let task = TaskSpec {
            categories: args
                .categories
                .as_deref()
                .map(split_list)
                .unwrap_or_default(),
            gains: parse_gains(&args.gains).map_err(anyhow::Error::msg)?,
        };
        print!("{}", render_plan(&model, &task)?);
    }
    Ok(())
}

fn pct(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The tree as a table.
pub fn render(model: &Model) -> String {
    let m = model.manifest();
    let mut out = format!("model {} ({})\n", m.name, m.content_hash);
    out += &format!(
        "backbone (edge): params {}, MACs {}, output {:?}\n",
        m.backbone.params, m.backbone.macs, m.backbone.output_shape
    );
    out += &format!(
        "{:<22} {:>9} {:>11}  categories\n",
        "segment (cloud)", "params", "MACs"
    );
    for (i, s) in model.segments().iter().enumerate() {
        let mut depth = 0;
        let mut p = model.parent_of(i);
        while let Some(q) = p {
            depth += 1;
            p = model.parent_of(q);
        }
        let names: Vec<&str> = s
            .categories
            .iter()
            .map(|&c| model.categories()[c].as_str())
            .collect();
        out += &format!(
            "{:<22} {:>9} {:>11}  {}\n",
            format!("{}{}", "  ".repeat(depth), s.id),
            s.params,
            s.macs,
            names.join(", ")
        );
    }
    out += &format!(
        "{:<22} {:>9} {:>11}\n",
        "cloud total",
        model.cloud_params_total(),
        model.cloud_macs_total()
    );
    out
}

/// What a task keeps and excludes.
pub fn render_plan(model: &Model, task: &TaskSpec) -> anyhow::Result<String> {
    let plan = model.plan(task)?;
    let kept: Vec<&str> = plan
        .segments
        .iter()
        .map(|&s| model.segments()[s].id.as_str())
        .collect();
    let excluded: Vec<&str> = (0..model.segments().len())
        .filter(|s| !plan.segments.contains(s))
        .map(|s| model.segments()[s].id.as_str())
        .collect();
    let relevant: Vec<&str> = plan
        .relevant
        .iter()
        .map(|&c| model.categories()[c].as_str())
        .collect();
    let (cp, cm) = (model.cloud_params_total(), model.cloud_macs_total());
    let b = &model.manifest().backbone;
    let mut out = format!("\ntask: categories [{}]\n", relevant.join(", "));
    out += &format!(
        "  runs:     {}\n  excludes: {}\n",
        kept.join(", "),
        if excluded.is_empty() {
            "-".into()
        } else {
            excluded.join(", ")
        }
    );
    out += &format!(
        "  cloud params {} of {} ({:.1} % excluded), cloud MACs {} of {} ({:.1} % excluded)\n",
        plan.cloud_params,
        cp,
        pct(cp - plan.cloud_params, cp),
        plan.cloud_macs,
        cm,
        pct(plan.cloud_macs_saved, cm)
    );
    out += &format!(
        "  whole model: params {:.1} % excluded, MACs {:.1} % excluded\n",
        pct(cp - plan.cloud_params, cp + b.params),
        pct(plan.cloud_macs_saved, cm + b.macs)
    );
    Ok(out)
}
