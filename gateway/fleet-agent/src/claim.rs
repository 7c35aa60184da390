//! Provisioning by claim, the gateway side (the exchange is described in
//! `gateway_fleet::provision`): connect with the claim credential, publish the CSR, wait for
//! the vendor's signed `provision` command, install what it carries, and return the device
//! id. The daemon then deletes the claim credential and starts the [`crate::FleetAgent`]
//! as the device.

use std::fmt;
use std::sync::Arc;

use gateway_fleet::provision::CsrMessage;
use gateway_fleet::topics::{csr_topic, provision_state_topic, provision_subscription};
use gateway_fleet::{DeviceId, FleetState, Op, StateMessage, VendorKey, parse_provision_topic};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::agent::{
    BACKOFF_INITIAL, BACKOFF_MAX, KEEP_ALIVE, REQUEST_CAPACITY, SHUTDOWN_FLUSH, describe, now_unix,
    publish,
};
use gateway_fleet::command::MAX_PAYLOAD_BYTES;

/// Checks and installs the vendor's certificate for `device` (PEM chain, leaf first): it
/// must certify this gateway's identity key and name `device`. `Err` is a reason safe to
/// send to the vendor (no secrets; the certificate is the vendor's own).
pub type InstallFn = Arc<dyn Fn(&DeviceId, &str) -> Result<(), String> + Send + Sync>;

/// Where and as whom to claim.
#[derive(Clone)]
pub struct ClaimSettings {
    /// The claim certificate's CN: client id, MQTT user and `prov/{claim}/` topics.
    pub claim: DeviceId,
    pub host: String,
    pub port: u16,
    /// Broker CA and the claim certificate and key.
    pub tls: Arc<rustls::ClientConfig>,
    /// PKCS#10 request signed by the device identity key.
    pub csr_pem: String,
    pub version: String,
}

impl fmt::Debug for ClaimSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimSettings")
            .field("claim", &self.claim)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Runs the claim until the vendor's answer is installed (`Some(device id)`) or `shutdown`
/// turns true (`None`). Reconnects with the agent's backoff; republishes the CSR on every
/// connection. `state` gets the accepted sequence and, on success, the device id.
pub async fn provision_by_claim(
    settings: &ClaimSettings,
    key: &VendorKey,
    state: &mut FleetState,
    install: &InstallFn,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<DeviceId> {
    let mut options = MqttOptions::new(
        settings.claim.as_str(),
        settings.host.clone(),
        settings.port,
    );
    options
        .set_clean_session(true)
        .set_keep_alive(KEEP_ALIVE)
        .set_max_packet_size(MAX_PAYLOAD_BYTES + 4096, MAX_PAYLOAD_BYTES + 4096)
        .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::clone(&settings.tls),
        )));
    let (client, mut events) = AsyncClient::new(options, REQUEST_CAPACITY);
    info!(
        broker = %format!("{}:{}", settings.host, settings.port),
        claim = %settings.claim,
        "not provisioned yet: claiming a device identity from the vendor"
    );
    let mut backoff = BACKOFF_INITIAL;
    loop {
        let mut retry_in = None;
        let mut provisioned = None;
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return None,
            event = events.poll() => match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    info!("fleet broker connected with the claim credential: publishing the CSR");
                    backoff = BACKOFF_INITIAL;
                    on_connected(&client, settings);
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    provisioned = on_publish(&client, settings, key, state, install, &p.topic, &p.payload);
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        warn!("fleet broker refused the provisioning subscription (ACL?)");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %describe(&e), retry_in = ?backoff, "fleet broker connection failed (claim)");
                    retry_in = Some(backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            },
        }
        if let Some(device) = provisioned {
            finish(&client, &mut events).await;
            return Some(device);
        }
        if let Some(wait) = retry_in {
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return None,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn on_connected(client: &AsyncClient, settings: &ClaimSettings) {
    if let Err(e) = client.try_subscribe(provision_subscription(&settings.claim), QoS::AtLeastOnce)
    {
        warn!(error = %e, "cannot queue the provisioning subscription");
    }
    let csr = CsrMessage {
        v: 1,
        claim: settings.claim.as_str().to_owned(),
        csr: settings.csr_pem.clone(),
        version: settings.version.clone(),
        at: now_unix(),
    };
    publish(client, csr_topic(&settings.claim), true, csr.to_json());
}

/// One incoming publish; `Some(device)` once the vendor's certificate is installed.
fn on_publish(
    client: &AsyncClient,
    settings: &ClaimSettings,
    key: &VendorKey,
    state: &mut FleetState,
    install: &InstallFn,
    topic: &str,
    payload: &[u8],
) -> Option<DeviceId> {
    let claim = &settings.claim;
    let Some((op, cmd_id)) = parse_provision_topic(claim, topic) else {
        debug!(
            bytes = payload.len(),
            "ignored a publish outside the provisioning topics"
        );
        return None;
    };
    let (op, cmd_id) = (op.to_owned(), cmd_id.to_owned());
    let state_topic = provision_state_topic(claim, &op, &cmd_id).ok()?;
    let send = |m: StateMessage| publish(client, state_topic.clone(), false, m.to_json());
    send(StateMessage::init(&cmd_id, &op, now_unix()));
    let command = match key.verify(
        payload,
        claim.as_str(),
        &op,
        &cmd_id,
        now_unix(),
        state.last_seq(),
    ) {
        Ok(command) => command,
        Err(rejection) => {
            warn!(%op, %cmd_id, code = rejection.code(), reason = %rejection.reason(), "provisioning answer rejected");
            send(StateMessage::rejected(&cmd_id, &op, &rejection, now_unix()));
            return None;
        }
    };
    let Op::Provision {
        device_id,
        certificate,
    } = &command.op
    else {
        send(StateMessage::failed(
            &cmd_id,
            &op,
            "not-provisioned",
            "this gateway is not provisioned yet: only provision is accepted on its claim topics",
            now_unix(),
        ));
        return None;
    };
    if let Err(e) = state.accept(command.seq) {
        warn!(%cmd_id, error = %e, "cannot persist the fleet sequence: provisioning not applied");
        send(StateMessage::failed(
            &cmd_id,
            &op,
            "state-write",
            "the gateway could not persist the command sequence; nothing was changed",
            now_unix(),
        ));
        return None;
    }
    send(StateMessage::executing(&cmd_id, &op, now_unix()));
    if let Err(reason) = install(device_id, certificate) {
        warn!(%cmd_id, device = %device_id, %reason, "provisioning certificate refused");
        send(StateMessage::failed(
            &cmd_id,
            &op,
            "certificate-rejected",
            &reason,
            now_unix(),
        ));
        return None;
    }
    if let Err(e) = state.set_device_id(device_id) {
        warn!(%cmd_id, error = %e, "certificate installed but the device id could not be stored");
        send(StateMessage::failed(
            &cmd_id,
            &op,
            "state-write",
            "the gateway could not persist its device id; it will claim again",
            now_unix(),
        ));
        return None;
    }
    info!(%cmd_id, device = %device_id, "provisioned by claim: certificate installed, device id stored");
    send(StateMessage::successful(&cmd_id, &op, now_unix()));
    // Clear the retained CSR so that the vendor's service does not see this claim again.
    publish(client, csr_topic(claim), true, Vec::new());
    Some(device_id.clone())
}

/// Delivers the queued state and CSR-clearing publishes, then disconnects (at most 2 s).
async fn finish(client: &AsyncClient, events: &mut EventLoop) {
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(SHUTDOWN_FLUSH, async {
        while events.poll().await.is_ok() {}
    })
    .await;
}
