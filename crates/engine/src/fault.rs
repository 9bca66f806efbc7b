//! Test-only fault injection at run time: a request whose prompt contains the configured marker
//! arms the fault, and the next engine step suffers it (see [`FaultInjection`]). Inert unless
//! `EngineConfig::fault_injection` is set.

use std::time::Duration;

use spindle_model::TokenizerBundle;

use crate::api::EngineError;
use crate::config::FaultInjection;
use crate::handle::Liveness;

/// The configured fault and whether it is armed.
pub(crate) struct FaultInjector {
    fault: Option<FaultInjection>,
    armed: bool,
}

impl FaultInjector {
    pub(crate) fn new(fault: Option<FaultInjection>) -> Self {
        Self {
            fault,
            armed: false,
        }
    }

    /// Arm the fault when the prompt's text contains the marker.
    pub(crate) fn arm_if_marked(&mut self, tokenizer: &TokenizerBundle, prompt: &[u32]) {
        let Some(fault) = &self.fault else {
            return;
        };
        let marked = tokenizer
            .decode(prompt, false)
            .is_ok_and(|text| text.contains(fault.marker()));
        if marked {
            tracing::warn!(
                ?fault,
                "fault-injection marker seen; the next engine step fails"
            );
            self.armed = true;
        }
    }

    /// Inflict the armed fault, if any: panic, fail the step, or hang without a heartbeat until
    /// the watchdog declares the engine dead.
    pub(crate) fn inject_if_armed(&mut self, liveness: &Liveness) -> Result<(), EngineError> {
        if !std::mem::take(&mut self.armed) {
            return Ok(());
        }
        match &self.fault {
            None => Ok(()),
            Some(FaultInjection::Panic { .. }) => panic!("injected fault: engine panic"),
            Some(FaultInjection::Error { .. }) => Err(EngineError::InjectedFault("engine error")),
            Some(FaultInjection::Stall { .. }) => {
                while !liveness.is_dead() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(EngineError::EngineDead(liveness.death_reason()))
            }
        }
    }
}
