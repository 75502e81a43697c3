//! Runs one instance of the cluster (a router or a storage) in this process until
//! shutdown: the thin layer between `billcl run INSTANCE` and the roles.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};

use crate::config::{ClusterConfig, Role};
use crate::router::Router;
use crate::storage::StorageNode;
use crate::tls;

/// Serve `instance` of `config` until `shutdown` resolves.
pub async fn run(
    config: ClusterConfig,
    instance: &str,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let me = config.instance(instance)?;
    let ca = tls::ca_pem(&config)?;
    let identity = tls::identity(&config, instance)?;
    let address = me.address();
    let server = billcl_client::server_endpoint(
        address,
        &identity.cert_chain_pem,
        &identity.key_pem,
        Some(&ca),
    )
    .with_context(|| format!("cannot listen on {address} (UDP) for {instance}"))?;
    let bind: SocketAddr = if address.is_ipv6() {
        "[::1]:0".parse()?
    } else {
        "127.0.0.1:0".parse()?
    };
    let bind = if address.ip().is_loopback() {
        bind
    } else if address.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    let mut client = billcl_client::client_endpoint(&ca, Some(&identity), bind)
        .context("cannot open the outgoing QUIC endpoint")?;
    client.set_default_client_config(node_link_client_config(&ca, &identity)?);
    tracing::info!(instance, %address, "starting");
    match me.role {
        Role::Router { .. } => {
            let router = Arc::new(Router::new(&config, client));
            router.dial_members();
            tokio::spawn(reload_on_hangup(router.clone()));
            // The first router runs the rebalancer, following `[rebalancer]` as the file says
            // it now (`billcl reload` turns it on or off).
            let first_router = config.routers.keys().next().map(String::as_str);
            if first_router == Some(instance) {
                tokio::spawn(crate::rebalance::run(router.clone()));
            }
            let stats = router.stats.clone();
            billcl_client::serve_counted(
                server.clone(),
                move |request| router.clone().handle(request),
                shutdown,
                stats,
            )
            .await;
            flush_closes(&server).await;
        }
        Role::Storage {
            replicaset,
            node_id,
            ..
        } => {
            let node = StorageNode::start(&config, instance, &replicaset, node_id, client).await?;
            tokio::spawn(crate::priority::follow_role(
                node.clone(),
                config.replication.learner_nice,
            ));
            let serving = node.clone();
            billcl_client::serve_counted(
                server.clone(),
                move |request| serving.clone().handle(request),
                shutdown,
                node.stats.clone(),
            )
            .await;
            flush_closes(&server).await;
            node.replica
                .shutdown()
                .await
                .context("replication did not shut down cleanly")?;
        }
    }
    tracing::info!(instance, "stopped");
    Ok(())
}

/// A router reads its cluster file again on SIGHUP, as on `billcl reload` (a daemon's
/// convention: `systemctl reload`, `kill -HUP PID`); what it did goes to its log.
async fn reload_on_hangup(router: Arc<Router>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    else {
        tracing::warn!("cannot handle SIGHUP: `billcl reload` reloads this router");
        return;
    };
    while hangups.recv().await.is_some() {
        if let Err(refused) = router.reload().await {
            tracing::warn!(
                "SIGHUP: the cluster file was not reloaded: {}",
                refused.message
            );
        }
    }
}

/// A node-to-node link (router→storage, storage→storage) with no packet for this long is
/// closed. Keep-alives every [`NODE_LINK_KEEP_ALIVE_MS`] keep a live link open; a killed peer
/// sends nothing (not even a close), so this bounds how long requests to it wait before they
/// fail and the router looks for the new leader (clients keep the SDK's 30 s).
pub const NODE_LINK_IDLE_TIMEOUT_MS: u32 = 2_500;
/// How often a node pings its peers on an otherwise idle link.
pub const NODE_LINK_KEEP_ALIVE_MS: u64 = 500;

/// The client side of node-to-node links: the SDK's limits (streams in flight, acknowledgement
/// frequency), with a short keep-alive and idle timeout.
fn node_link_client_config(
    ca: &str,
    identity: &billcl_client::TlsIdentity,
) -> Result<quinn::ClientConfig> {
    let mut config = billcl_client::client_config(ca, Some(identity))
        .context("cannot configure node-to-node QUIC links")?;
    config.transport_config(billcl_client::transport_config_with(
        std::time::Duration::from_millis(NODE_LINK_KEEP_ALIVE_MS),
        std::time::Duration::from_millis(u64::from(NODE_LINK_IDLE_TIMEOUT_MS)),
    ));
    Ok(config)
}

/// Give the endpoint a moment to tell peers the connections are closed, so they learn it
/// at once instead of after their idle timeout.
async fn flush_closes(endpoint: &quinn::Endpoint) {
    let _ = tokio::time::timeout(std::time::Duration::from_millis(500), endpoint.wait_idle()).await;
}
