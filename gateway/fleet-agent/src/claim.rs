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
use gateway_mqtt::{Backoff, Broker, Ended, Flow, Handler, Publisher, Session, SessionConfig};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::agent::{
    BACKOFF_INITIAL, BACKOFF_MAX, CallbackError, KEEP_ALIVE, MAX_PACKET_BYTES, REQUEST_CAPACITY,
    now_unix, publish,
};

/// Checks and installs the vendor's certificate for `device` (PEM chain, leaf first): it
/// must certify this gateway's identity key and name `device`. The error's text is sent to
/// the vendor as the reason (no secrets; the certificate is the vendor's own).
pub type InstallFn = Arc<dyn Fn(&DeviceId, &str) -> Result<(), CallbackError> + Send + Sync>;

/// Where and as whom to claim.
#[derive(Clone)]
pub struct ClaimSettings {
    /// The claim certificate's CN: client id, MQTT user and `prov/{claim}/` topics.
    pub claim: DeviceId,
    /// The fleet broker with the claim credential's TLS configuration (broker CA, claim
    /// certificate and key).
    pub broker: Broker,
    /// PKCS#10 request signed by the device identity key.
    pub csr_pem: String,
    pub version: String,
}

impl fmt::Debug for ClaimSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClaimSettings")
            .field("claim", &self.claim)
            .field("broker", &self.broker)
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
    // A clean session as the claim id: nothing of a claim outlives its connection.
    let config = SessionConfig::new(
        "fleet claim",
        settings.claim.as_id().clone(),
        settings.broker.clone(),
    )
    .clean_session(true)
    .keep_alive(KEEP_ALIVE)
    .max_packet_bytes(MAX_PACKET_BYTES)
    .request_capacity(REQUEST_CAPACITY)
    .backoff(Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX))
    .subscribe(provision_subscription(&settings.claim));
    let session = match config.and_then(Session::new) {
        Ok(session) => session,
        Err(e) => {
            error!(error = %e, "provisioning by claim cannot start");
            return None;
        }
    };
    info!(
        broker = %settings.broker,
        claim = %settings.claim,
        "not provisioned yet: claiming a device identity from the vendor"
    );
    let mut claim = Claim {
        settings,
        key,
        state,
        install,
        provisioned: None,
    };
    match session.run(&mut claim, shutdown.clone()).await {
        Ended::Stopped => claim.provisioned,
        Ended::Shutdown => None,
    }
}

/// The claim's side of the session.
struct Claim<'a> {
    settings: &'a ClaimSettings,
    key: &'a VendorKey,
    state: &'a mut FleetState,
    install: &'a InstallFn,
    provisioned: Option<DeviceId>,
}

impl Handler for Claim<'_> {
    async fn on_connect(&mut self, out: &Publisher, _session_present: bool) {
        info!("fleet broker connected with the claim credential: publishing the CSR");
        let settings = self.settings;
        let csr = CsrMessage {
            v: 1,
            claim: settings.claim.as_str().to_owned(),
            csr: settings.csr_pem.clone(),
            version: settings.version.clone(),
            at: now_unix(),
        };
        publish(out, csr_topic(&settings.claim), true, csr.to_json());
    }

    async fn on_message(&mut self, out: &Publisher, topic: &str, payload: &[u8]) -> Flow {
        self.provisioned = on_publish(
            out,
            self.settings,
            self.key,
            self.state,
            self.install,
            topic,
            payload,
        );
        if self.provisioned.is_some() {
            Flow::Stop
        } else {
            Flow::Continue
        }
    }
}

/// One incoming publish; `Some(device)` once the vendor's certificate is installed.
fn on_publish(
    client: &Publisher,
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
            &reason.to_string(),
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
