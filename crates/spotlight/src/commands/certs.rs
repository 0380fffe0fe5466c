//! `spotlight certs`: a development CA, certificates and tokens, and the settings to use them.

use spotlight_service::certs::DevPki;

use crate::cli::CertsArgs;

pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let pki = DevPki::generate(&args.hosts).map_err(anyhow::Error::msg)?;
    let written = pki
        .write(&args.out, args.force)
        .map_err(anyhow::Error::msg)?;
    let d = args.out.display();
    println!(
        "wrote {} files to {d} (keys and tokens readable by you only)\n",
        written.len()
    );
    println!("# coordinator (serves edges, workers, operators; calls workers)");
    println!(
        "spotlight coordinator --ca {d}/ca.pem --cert {d}/coordinator.pem --key {d}/coordinator.key --tokens {d}/tokens.toml --token-file {d}/coordinator.token"
    );
    println!("# worker (advertises https://…; registers with the worker token)");
    println!(
        "spotlight worker --coordinator https://127.0.0.1:7000 --ca {d}/ca.pem --cert {d}/worker.pem --key {d}/worker.key --tokens {d}/tokens.toml --token-file {d}/worker.token"
    );
    println!("# edge");
    println!(
        "spotlight edge --coordinator https://127.0.0.1:7000 --ca {d}/ca.pem --token-file {d}/edge.token"
    );
    println!("# operator (change the task); reader.token may only read");
    println!(
        "spotlight task get --coordinator https://127.0.0.1:7000 --ca {d}/ca.pem --token-file {d}/operator.token"
    );
    println!(
        "curl --cacert {d}/ca.pem -H \"Authorization: Bearer $(cat {d}/reader.token)\" https://127.0.0.1:7080/v1/task"
    );
    println!(
        "\n# Mutual TLS: add --mtls to every command, and --cert/--key to the edge ({d}/edge.pem, {d}/edge.key)\n# and to the operator ({d}/operator.pem, {d}/operator.key). The same keys go in a config file's\n# [security] section (ca, cert, key, tokens, token, mtls). Certificates, keys and tokens files are\n# re-read when they change; servers pick up new ones without a restart."
    );
    Ok(())
}
