//! Tops up accounts and reads them back through a running cluster's router.
//!
//! ```text
//! cargo run --release -p billcl-client --example topup -- [--router ADDR] [--tls DIR] ID AMOUNT [ID AMOUNT…]
//! ```
//!
//! `--router` defaults to the default cluster's router, `127.0.0.1:3301`; `--tls` to `data/tls`,
//! the directory `billcl start` writes the cluster CA (`ca.pem`) and the client certificate
//! (`client.pem`, `client.key`) to. Each top-up is retried safely by the SDK (same idempotency
//! key); what each error means for the caller is shown by its [`ErrorKind`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use billcl_client::{Client, ClientConfig, Decimal, ErrorKind, TlsIdentity};

fn usage() -> ExitCode {
    eprintln!("usage: topup [--router ADDR] [--tls DIR] ID AMOUNT [ID AMOUNT...]");
    ExitCode::FAILURE
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let mut router: SocketAddr = "127.0.0.1:3301".parse().expect("a valid address");
    let mut tls = PathBuf::from("data/tls");
    let mut pairs = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--router" => match args.next().and_then(|a| a.parse().ok()) {
                Some(address) => router = address,
                None => return usage(),
            },
            "--tls" => match args.next() {
                Some(dir) => tls = PathBuf::from(dir),
                None => return usage(),
            },
            id => {
                let (Ok(id), Some(Ok(amount))) =
                    (id.parse::<u64>(), args.next().map(|a| Decimal::parse(&a)))
                else {
                    return usage();
                };
                pairs.push((id, amount));
            }
        }
    }
    if pairs.is_empty() {
        return usage();
    }
    let read = |name: &str| {
        let path = tls.join(name);
        std::fs::read_to_string(&path)
            .map_err(|error| eprintln!("cannot read {}: {error}", path.display()))
    };
    let (Ok(ca_pem), Ok(cert_chain_pem), Ok(key_pem)) =
        (read("ca.pem"), read("client.pem"), read("client.key"))
    else {
        return ExitCode::FAILURE;
    };
    let mut config = ClientConfig::new(vec![router], ca_pem);
    config.identity = Some(TlsIdentity {
        cert_chain_pem,
        key_pem,
    });
    config.caller = "topup-example".to_string();
    let client = match Client::connect(config).await {
        Ok(client) => client,
        Err(error) => {
            eprintln!("cannot reach the router at {router}: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut failed = false;
    for (id, amount) in pairs {
        let before = client.account(id).await;
        match client.add_money(id, amount).await {
            Ok(_) => {}
            Err(error) => {
                failed = true;
                match error.kind() {
                    ErrorKind::NotFound => eprintln!("account {id} does not exist: {error}"),
                    ErrorKind::InvalidArgument | ErrorKind::ProcedureFailed => {
                        eprintln!("top-up of {id} refused: {error}")
                    }
                    ErrorKind::Timeout | ErrorKind::Unavailable | ErrorKind::Retryable => {
                        eprintln!(
                            "top-up of {id} not confirmed (retried until the timeout): {error}"
                        )
                    }
                    kind => eprintln!("top-up of {id} failed ({}): {error}", kind.name()),
                }
                continue;
            }
        }
        match (before, client.account(id).await) {
            (Ok(before), Ok(after)) => println!(
                "account {id}: {} + {amount} -> {} (velocity {}/s)",
                before.balance, after.balance, after.velocity
            ),
            (_, Ok(after)) => println!("account {id}: now {}", after.balance),
            (_, Err(error)) => {
                failed = true;
                eprintln!("cannot read account {id}: {error}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
