//! The scenario list and its execution, with a progress bar.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use spotlight_codec::Codec;
use spotlight_model::{Model, preprocess};
use spotlight_proto::v1 as pb;
use spotlight_runtime::BackboneSession;

use crate::cloud::{Cluster, ClusterSpec, Load};
use crate::inproc::EdgeLoad;
use crate::{BenchOptions, Machine, Measured, Results, Row, codec_name, cores, task_sets};

impl Scenario {
    fn name(&self) -> String {
        match self {
            Scenario::Peer { batch } => format!("peer batch {batch}"),
            Scenario::Stages => "stages".into(),
            Scenario::Rounds { .. } => "rounds".into(),
            Scenario::Cloud { name, .. }
            | Scenario::Split { name, .. }
            | Scenario::Processes { name, .. } => name.clone(),
        }
    }
}

/// One thing to measure.
enum Scenario {
    Peer {
        batch: usize,
    },
    Stages,
    /// The P3 protocol: peer and cloud alternated in short slices, `rounds` times, so that
    /// each ratio compares figures taken seconds apart on a noisy, shared machine.
    Rounds {
        rounds: usize,
    },
    Cloud {
        spec: ClusterSpec,
        task: usize,
        load: Load,
        codec: Codec,
        name: String,
    },
    /// `spotlight edge` as a process against the cloud processes, from raw images.
    Processes {
        task: usize,
        window: usize,
        frames: usize,
        name: String,
    },
    Split {
        task: usize,
        load: EdgeLoad,
        name: String,
    },
}

fn plan(opts: &BenchOptions, tasks: usize) -> Vec<Scenario> {
    let n = opts.frames;
    let cloud = |spec: ClusterSpec, task: usize, streams, window, codec, frames, name: String| {
        Scenario::Cloud {
            spec,
            task,
            load: Load {
                streams,
                window,
                frames,
            },
            codec,
            name,
        }
    };
    let default = ClusterSpec::default();
    let mut s = vec![
        Scenario::Peer { batch: 1 },
        Scenario::Peer { batch: 64 },
        Scenario::Stages,
        Scenario::Rounds {
            rounds: if opts.quick { 2 } else { 11 },
        },
    ];
    // The P3 rows: every task set under load.
    for t in 0..tasks {
        s.push(cloud(
            default.clone(),
            t,
            8,
            64,
            Codec::Int8,
            n,
            format!("cloud task {t}"),
        ));
    }
    s.push(cloud(
        default.clone(),
        0,
        1,
        1,
        Codec::Int8,
        opts.latency_frames,
        "cloud window 1".into(),
    ));
    if !opts.quick {
        for w in [8, 64, 256] {
            s.push(cloud(
                default.clone(),
                0,
                1,
                w,
                Codec::Int8,
                n,
                format!("cloud window {w}"),
            ));
        }
        for streams in [1, 4, 16, 64] {
            s.push(cloud(
                default.clone(),
                0,
                streams,
                16,
                Codec::Int8,
                n,
                format!("cloud streams {streams}"),
            ));
        }
        for codec in [Codec::F32, Codec::F16] {
            s.push(cloud(
                default.clone(),
                0,
                8,
                64,
                codec,
                n,
                format!("cloud codec {}", codec_name(codec)),
            ));
        }
    }
    let batches: &[usize] = if opts.quick { &[1] } else { &[1, 8, 256] };
    for &b in batches {
        let spec = ClusterSpec {
            max_batch: b,
            ..ClusterSpec::default()
        };
        s.push(cloud(
            spec,
            0,
            8,
            64,
            Codec::Int8,
            n,
            format!("cloud worker batch {b}"),
        ));
    }
    if !opts.quick {
        let spec = ClusterSpec {
            max_queue_delay_us: 500,
            ..ClusterSpec::default()
        };
        s.push(cloud(
            spec,
            0,
            8,
            64,
            Codec::Int8,
            n,
            "cloud queue delay 500us".into(),
        ));
        for t in 0..tasks {
            let spec = ClusterSpec {
                single_worker: true,
                batch_threads: 2,
                ..ClusterSpec::default()
            };
            s.push(cloud(
                spec,
                t,
                8,
                64,
                Codec::Int8,
                n,
                format!("cloud single worker 2 threads task {t}"),
            ));
        }
        let spec = ClusterSpec {
            replicas: 2,
            ..ClusterSpec::default()
        };
        s.push(cloud(
            spec,
            0,
            8,
            64,
            Codec::Int8,
            n,
            "cloud replicas 2".into(),
        ));
    }
    let stub = ClusterSpec {
        stub: true,
        ..ClusterSpec::default()
    };
    s.push(cloud(
        stub.clone(),
        0,
        8,
        128,
        Codec::Int8,
        // Routing alone is fast: enough frames for the coordinator's CPU time to be well
        // above the machine's noise.
        n * 10,
        "router all".into(),
    ));
    s.push(cloud(
        stub.clone(),
        0,
        1,
        1,
        Codec::Int8,
        opts.latency_frames,
        "router window 1".into(),
    ));
    if !opts.quick {
        s.push(cloud(
            stub.clone(),
            1,
            8,
            128,
            Codec::Int8,
            n * 10,
            "router one group".into(),
        ));
        // Coordinator replicas sharing etcd, the same load spread over them (only where
        // etcd is installed).
        if etcd_installed() {
            s.push(cloud(
                ClusterSpec {
                    coordinators: 2,
                    ..stub
                },
                0,
                8,
                128,
                Codec::Int8,
                n * 10,
                "router 2 replicas".into(),
            ));
        }
    }
    // Every role a process of its own, from raw images.
    for t in 0..tasks {
        s.push(Scenario::Processes {
            task: t,
            window: 64,
            frames: n,
            name: format!("processes task {t}"),
        });
    }
    // Every role in one process, from raw images.
    let edge = |window, backbone_threads, frames| EdgeLoad {
        frames,
        window,
        codec: Codec::Int8,
        backbone_threads,
    };
    for t in 0..tasks {
        s.push(Scenario::Split {
            task: t,
            load: edge(64, 1, n),
            name: format!("split task {t}"),
        });
    }
    s.push(Scenario::Split {
        task: 0,
        load: edge(1, 1, opts.latency_frames),
        name: "split window 1".into(),
    });
    if !opts.quick {
        s.push(Scenario::Split {
            task: 0,
            load: edge(256, 1, n),
            name: "split window 256".into(),
        });
        s.push(Scenario::Split {
            task: 0,
            load: edge(256, 2, n),
            name: "split window 256, 2 backbone threads".into(),
        });
    }
    s
}

/// Loads `n` test images and labels.
pub(crate) fn load_images(
    opts: &BenchOptions,
    n: usize,
) -> anyhow::Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let images = spotlight_edge::idx::read_images(&opts.dataset.join("t10k-images-idx3-ubyte.gz"))
        .with_context(|| {
            format!(
                "reading test images under {} (run `make dataset`)",
                opts.dataset.display()
            )
        })?;
    let labels = spotlight_edge::idx::read_labels(&opts.dataset.join("t10k-labels-idx1-ubyte.gz"))?;
    let n = n.min(images.count);
    let imgs = (0..n)
        .filter_map(|i| images.image(i).map(<[u8]>::to_vec))
        .collect();
    Ok((imgs, labels[..n].to_vec()))
}

/// Backbone features of `images`, encoded with `codec`.
pub(crate) fn tensors(
    model: &Model,
    images: &[Vec<u8>],
    codec: Codec,
) -> anyhow::Result<Vec<pb::FeatureTensor>> {
    let mut backbone = BackboneSession::open(model, 1)?;
    let mut buf = Vec::new();
    let mut out = Vec::with_capacity(images.len());
    for chunk in images.chunks(64) {
        let mut x = Vec::new();
        for img in chunk {
            preprocess(&model.manifest().input, img, &mut buf);
            x.extend_from_slice(&buf);
        }
        let f = backbone.run(x, chunk.len())?;
        for one in f.chunks(model.feature_len()) {
            let e = spotlight_codec::encode(codec, one);
            out.push(pb::FeatureTensor {
                codec: codec.wire(),
                shape: model.feature_shape(1),
                data: e.data.into(),
                scale: e.scale,
                zero_point: e.zero_point,
                ..Default::default()
            });
        }
    }
    Ok(out)
}

/// Runs every scenario and returns the figures (nothing written yet).
pub async fn run(opts: &BenchOptions, model: Arc<Model>) -> anyhow::Result<Results> {
    let tasks = task_sets(&model);
    let scenarios: Vec<Scenario> = plan(opts, tasks.len())
        .into_iter()
        .filter(|s| {
            opts.only
                .as_ref()
                .is_none_or(|o| s.name().contains(o.as_str()))
        })
        .collect();
    let bar = ProgressBar::new(scenarios.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let n_images = opts.frames.max(opts.latency_frames).min(10_000);
    let (images, labels) = load_images(opts, n_images)?;
    let mut tensor_cache: BTreeMap<&'static str, Arc<Vec<pb::FeatureTensor>>> = BTreeMap::new();
    let logs = crate::cloud::log_dir()?;
    let mut rows = Vec::new();
    let mut stages = crate::stages::Stages::default();
    let mut cluster: Option<Cluster> = None;
    let exe = opts.exe.clone();
    for scenario in scenarios {
        match scenario {
            Scenario::Peer { batch } => {
                let name = if batch == 1 {
                    "peer batch 1".to_string()
                } else {
                    format!("peer batch {batch}")
                };
                bar.set_message(name.clone());
                let m = crate::peer::run(
                    &model,
                    &images[..opts.frames.min(images.len())],
                    &labels,
                    cores(),
                    batch,
                )?;
                rows.push(row(
                    "peer",
                    &name,
                    [
                        ("batch", batch.to_string()),
                        ("threads", cores().to_string()),
                    ],
                    m,
                ));
            }
            Scenario::Stages => {
                bar.set_message("stages");
                let take = opts.latency_frames.min(images.len());
                let keep = (
                    stages.cloud_e2e_p50_us,
                    stages.cloud_e2e_p99_us,
                    stages.stub_e2e_p50_us,
                );
                stages = crate::stages::measure(&model, &images[..take])?;
                (
                    stages.cloud_e2e_p50_us,
                    stages.cloud_e2e_p99_us,
                    stages.stub_e2e_p50_us,
                ) = keep;
                // 32 batches of 64 for each task's compute floor (P3).
                let floor_images = &images[..(32 * 64).min(images.len())];
                stages.floor = crate::stages::compute_floor(&model, floor_images, &tasks)?;
            }
            Scenario::Rounds { rounds } => {
                let spec = ClusterSpec::default();
                let c = ensure_cluster(&mut cluster, &exe, &model, &logs, &spec).await?;
                let slice = (opts.frames / 2).max(1);
                let t = match tensor_cache.get("int8") {
                    Some(t) => t.clone(),
                    None => {
                        let t = Arc::new(tensors(&model, &images, Codec::Int8)?);
                        tensor_cache.insert("int8", t.clone());
                        t
                    }
                };
                for round in 0..rounds {
                    bar.set_message(format!("rounds: {}/{rounds}", round + 1));
                    for batch in [1, 64] {
                        let m = crate::peer::run(
                            &model,
                            &images[..slice.min(images.len())],
                            &labels,
                            cores(),
                            batch,
                        )?;
                        rows.push(row(
                            "rounds",
                            &format!("round {round} peer batch {batch}"),
                            [("round", round.to_string()), ("batch", batch.to_string())],
                            m,
                        ));
                    }
                    for (task, (task_name, categories)) in tasks.iter().enumerate() {
                        c.set_task(categories).await?;
                        let load = Load {
                            streams: 8,
                            window: 64,
                            frames: slice,
                        };
                        let mut m =
                            crate::cloud::drive(&[c.grpc], model.hash(), t.clone(), load, c.pids())
                                .await?;
                        let plan = model.plan(&spotlight_model::TaskSpec {
                            categories: categories.clone(),
                            gains: Default::default(),
                        })?;
                        m.cloud_macs = Some(plan.cloud_macs);
                        rows.push(row(
                            "rounds",
                            &format!("round {round} cloud task {task}"),
                            [("round", round.to_string()), ("task", task_name.clone())],
                            m,
                        ));
                    }
                }
            }
            Scenario::Cloud {
                spec,
                task,
                load,
                codec,
                name,
            } => {
                bar.set_message(name.clone());
                let c = ensure_cluster(&mut cluster, &exe, &model, &logs, &spec).await?;
                c.set_task(&tasks[task].1).await?;
                let key = codec_name(codec);
                let t = match tensor_cache.get(key) {
                    Some(t) => t.clone(),
                    None => {
                        let t = Arc::new(tensors(&model, &images, codec)?);
                        tensor_cache.insert(key, t.clone());
                        t
                    }
                };
                let before = c.stub_frames();
                let counters = c.batch_counters().await?;
                let mut m = crate::cloud::drive(&c.grpcs, model.hash(), t, load, c.pids()).await?;
                let after = c.batch_counters().await?;
                if after.1 > counters.1 {
                    m.mean_worker_batch =
                        Some((after.0 - counters.0) as f64 / (after.1 - counters.1) as f64);
                }
                let plan = model.plan(&spotlight_model::TaskSpec {
                    categories: tasks[task].1.clone(),
                    gains: Default::default(),
                })?;
                m.cloud_macs = Some(plan.cloud_macs);
                let section = if spec.stub { "router" } else { "cloud" };
                let mut params = vec![
                    ("task", tasks[task].0.clone()),
                    ("streams", load.streams.to_string()),
                    ("window", load.window.to_string()),
                    ("codec", key.to_string()),
                    ("replicas", spec.replicas.to_string()),
                ];
                if spec.coordinators > 1 {
                    params.push(("coordinators", spec.coordinators.to_string()));
                }
                if spec.stub {
                    params.push(("stub frames", (c.stub_frames() - before).to_string()));
                } else {
                    params.push(("worker max_batch", spec.max_batch.to_string()));
                    params.push(("queue delay us", spec.max_queue_delay_us.to_string()));
                }
                if name == "cloud window 1" {
                    stages.cloud_e2e_p50_us = m.p50_ms * 1e3;
                    stages.cloud_e2e_p99_us = m.p99_ms * 1e3;
                }
                if name == "router window 1" {
                    stages.stub_e2e_p50_us = m.p50_ms * 1e3;
                }
                rows.push(row(section, &name, params, m));
            }
            Scenario::Processes {
                task,
                window,
                frames,
                name,
            } => {
                bar.set_message(name.clone());
                let spec = ClusterSpec::default();
                let c = ensure_cluster(&mut cluster, &exe, &model, &logs, &spec).await?;
                c.set_task(&tasks[task].1).await?;
                let mut m = crate::cloud::edge_process(
                    &exe,
                    &model,
                    &opts.dataset,
                    c,
                    frames.min(10_000),
                    window,
                    &logs,
                )
                .await?;
                let plan = model.plan(&spotlight_model::TaskSpec {
                    categories: tasks[task].1.clone(),
                    gains: Default::default(),
                })?;
                m.cloud_macs = Some(plan.cloud_macs);
                rows.push(row(
                    "processes",
                    &name,
                    [
                        ("task", tasks[task].0.clone()),
                        ("window", window.to_string()),
                        ("codec", "int8".to_string()),
                    ],
                    m,
                ));
            }
            Scenario::Split { task, load, name } => {
                bar.set_message(name.clone());
                if let Some(c) = cluster.take() {
                    c.stop().await;
                }
                let m = crate::inproc::run(&model, &opts.dataset, &tasks[task].1, load).await?;
                rows.push(row(
                    "split",
                    &name,
                    [
                        ("task", tasks[task].0.clone()),
                        ("window", load.window.to_string()),
                        ("codec", codec_name(load.codec).to_string()),
                        ("backbone threads", load.backbone_threads.to_string()),
                    ],
                    m,
                ));
            }
        }
        bar.inc(1);
    }
    if let Some(c) = cluster.take() {
        c.stop().await;
    }
    bar.finish_with_message("done");
    Ok(Results {
        model: model.name().to_string(),
        model_hash: model.hash().to_string(),
        machine: Machine::probe(),
        started: String::new(),
        images: images.len(),
        rows,
        stages,
    })
}

/// The running cluster if it has `spec`, else a new one with it (the old one stopped).
/// Whether `etcd` (Debian's etcd-server) is on the PATH, for the replica scenario.
fn etcd_installed() -> bool {
    let found = std::process::Command::new("etcd")
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "skipping \"router 2 replicas\": etcd is not installed (apt-get install etcd-server)"
        );
    }
    found
}

async fn ensure_cluster<'a>(
    cluster: &'a mut Option<Cluster>,
    exe: &std::path::Path,
    model: &Arc<Model>,
    logs: &std::path::Path,
    spec: &ClusterSpec,
) -> anyhow::Result<&'a Cluster> {
    if cluster.as_ref().map(|c| &c.spec) != Some(spec) {
        if let Some(c) = cluster.take() {
            c.stop().await;
        }
        *cluster = Some(Cluster::start(exe, model, logs, spec.clone()).await?);
    }
    cluster
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("cluster not started"))
}

fn row(
    section: &str,
    name: &str,
    params: impl IntoIterator<Item = (&'static str, String)>,
    measured: Measured,
) -> Row {
    Row {
        section: section.to_string(),
        name: name.to_string(),
        params: params
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        measured,
    }
}
