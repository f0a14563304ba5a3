//! Workflows: a job's `steps` run in order, each through the same executor as a job of its own,
//! inside the job's lease, cancel and time limit. A step's targets may be the instances an earlier
//! step acted on or launched (`{"from_step": "<name>"}`).
//!
//! The workflow checkpoints an `Envelope` (`{"step": i, "done": [results of finished steps],
//! "inner": …}`), where `inner` is the running step's own checkpoint; a resumed attempt skips the finished steps and
//! resumes the running one from its own checkpoint (so a launch is not repeated: what a step creates
//! is tagged with the job id and the step's name). A failed step stops the workflow unless it says
//! `"on_failure": "continue"`; a transient failure ends the attempt so the job is retried from there.

use super::checkpoint::Envelope;
use super::Ec2Executor;
use crate::runner::{ExecCtx, ExecError, Executor};
use ec2jobd_spec::{IdList, JobError, JobResults, StepResult};

impl Ec2Executor {
    /// Runs a `workflow` job.
    pub(super) async fn workflow(&self, ctx: &ExecCtx) -> Result<JobResults, ExecError> {
        let steps = ctx.job.spec.steps.clone().unwrap_or_default();
        let n = steps.len();
        let cp = Envelope::of(ctx)?;
        let mut done: Vec<StepResult> = cp.done.clone();
        let with_steps = |done: &Vec<StepResult>| JobResults {
            steps: done.clone(),
            ..Default::default()
        };
        for (i, st) in steps.iter().enumerate().skip(done.len()) {
            // A step resuming after its parked wait ends itself (a cancel included).
            if !(cp.step == i && ctx.waited.is_some()) {
                ctx.check_cancel(&with_steps(&done))?;
            }
            let name = st.name.clone().unwrap_or_else(|| format!("step-{}", i + 1));
            let mut spec = (*st.spec).clone();
            if let Some(from) = spec.targets.from_step.take() {
                let ids: Vec<String> = done
                    .iter()
                    .find(|s| s.name == from)
                    .map(|s| {
                        s.results
                            .instances
                            .iter()
                            .map(|i| i.instance_id.clone())
                            .collect()
                    })
                    .unwrap_or_default();
                if ids.is_empty() {
                    let error = JobError {
                        code: "NoTargets".into(),
                        message: format!("step `{from}` left no instances for step `{name}`"),
                        request_id: None,
                    };
                    done.push(StepResult {
                        name: name.clone(),
                        action: spec.action.to_string(),
                        state: "failed".into(),
                        error: Some(error.clone()),
                        results: Box::default(),
                    });
                    return Err(stop(&steps, done, i, error));
                }
                spec.targets.instance_ids = Some(IdList(ids));
            }
            // The step resumes from its own checkpoint, kept in the envelope until it saves the
            // next (a second crash before then must find it still).
            let inner = (cp.step == i).then(|| cp.inner.clone()).flatten();
            let envelope = Envelope {
                step: i,
                done: done.clone(),
                inner: inner.clone(),
            }
            .to_value();
            ctx.save_checkpoint(envelope.clone()).await?;
            ctx.progress(
                "step",
                &format!("step {} of {n}: {name} ({})", i + 1, spec.action),
                Some(i as u64),
                Some(n as u64),
            )
            .await?;
            let action = spec.action.to_string();
            let sctx = ctx.step(spec, inner, envelope, (i, &name));
            let (state, error, results) = match self.execute(&sctx).await {
                Ok(r) => ("succeeded", None, r),
                Err(ExecError::Failed {
                    error,
                    transient: true,
                    results,
                }) => {
                    // The attempt ends; the retry resumes this step from its checkpoint.
                    let mut all = with_steps(&done);
                    all.instances = results.instances;
                    return Err(ExecError::Failed {
                        error,
                        transient: true,
                        results: all,
                    });
                }
                Err(ExecError::Failed { error, results, .. }) => ("failed", Some(error), results),
                Err(ExecError::Cancelled(results)) => {
                    done.push(StepResult {
                        name,
                        action,
                        state: "cancelled".into(),
                        error: None,
                        results: Box::new(results),
                    });
                    return Err(ExecError::Cancelled(with_steps(&done)));
                }
                // A step that parks parks the whole job (its checkpoint inside this envelope); the
                // job resumes in this step with the wait's outcome (`ExecCtx::waited`).
                Err(e @ (ExecError::LeaseLost | ExecError::Park(_))) => return Err(e),
            };
            let failure = error.clone();
            done.push(StepResult {
                name: name.clone(),
                action,
                state: state.into(),
                error,
                results: Box::new(results),
            });
            let next = Envelope {
                step: i + 1,
                done: done.clone(),
                inner: None,
            };
            ctx.save_checkpoint(next.to_value()).await?;
            if let Some(e) = failure {
                if st.on_failure.as_deref() != Some("continue") {
                    let error = JobError {
                        code: "StepFailed".into(),
                        message: format!("step `{name}` failed: {}: {}", e.code, e.message),
                        request_id: e.request_id,
                    };
                    return Err(stop(&steps, done, i, error));
                }
            }
        }
        let ok = done.iter().filter(|s| s.state == "succeeded").count();
        let mut results = with_steps(&done);
        // The last step with instances speaks for the job in `/outputs`.
        if let Some(s) = done.iter().rev().find(|s| !s.results.instances.is_empty()) {
            results.instances = s.results.instances.clone();
        }
        let summary = format!(
            "workflow: {ok} of {n} step(s) succeeded{}",
            if ok < n {
                ", the others failed and were let pass (on_failure continue)"
            } else {
                ""
            }
        );
        ctx.progress("done", &summary, Some(n as u64), Some(n as u64))
            .await?;
        results.summary = Some(summary);
        Ok(results)
    }
}

/// The workflow's failure at step `i` (already in `done`): later steps are listed as not run.
fn stop(
    steps: &[ec2jobd_spec::Step],
    mut done: Vec<StepResult>,
    i: usize,
    error: JobError,
) -> ExecError {
    for st in steps.iter().skip(i + 1) {
        done.push(StepResult {
            name: st.name.clone().unwrap_or_default(),
            action: st.spec.action.to_string(),
            state: "not_run".into(),
            error: None,
            results: Box::default(),
        });
    }
    ExecError::Failed {
        error,
        transient: false,
        results: JobResults {
            steps: done,
            ..Default::default()
        },
    }
}
