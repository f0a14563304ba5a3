//! Bulk instance actions in waves (`rate`): at most `max_concurrency` instances are called and
//! waited for at a time, each wave finishing before the next starts; once more than `max_errors`
//! instances failed, no new wave starts and the job fails listing what was done, what failed and what
//! was never touched. Each wave's outcome is checkpointed, so a resumed attempt skips the instances
//! an earlier attempt already handled.

use std::collections::HashMap;
use std::time::Instant;

use ec2jobd_ec2::{evaluate, Ec2, SharedCall, Verdict, WaitFailure};
use ec2jobd_spec::{JobError, JobResults, Rate, WaitUntil};

use super::{plan, Checkpoint, Ec2Executor};
use crate::parking::WaitOutcome;
use crate::runner::{ExecCtx, ExecError};

impl Ec2Executor {
    /// Makes `call` for `todo` in waves; `ids` are every target (for the results), `before` their
    /// states.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn in_waves(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        (account, region): (&str, &str),
        ids: &[String],
        before: &HashMap<String, String>,
        (call, todo): (&SharedCall, &[String]),
        rate: &Rate,
        mut results: JobResults,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let op = spec.action.as_str();
        let (until, timeout, interval) = spec.wait_settings();
        let n = todo.len();
        let size = rate.max_concurrency.of(n).max(1);
        let max_errors = rate.max_errors.of(n);
        let (mut done, mut failed) = match Checkpoint::of(ctx) {
            Some(Checkpoint::Waves { done, failed }) => (done, failed),
            _ => (Vec::new(), Vec::new()),
        };
        let waves = plan::waves(todo, &done, &failed, size);
        let started = Instant::now();
        let mut to_ok: HashMap<String, f64> = HashMap::new();
        let mut last: HashMap<String, ec2jobd_ec2::InstanceStatus> = HashMap::new();
        for (k, wave) in waves.iter().enumerate() {
            if failed.len() > max_errors {
                break;
            }
            ctx.check_cancel(&results)?;
            ctx.progress(
                "calling",
                &format!(
                    "wave {} of {}: {op} on {} instance(s) ({} done, {} failed)",
                    k + 1,
                    waves.len(),
                    wave.len(),
                    done.len(),
                    failed.len()
                ),
                Some(done.len() as u64),
                Some(n as u64),
            )
            .await?;
            match self.call(ec2, ctx, (account, region), call, wave).await {
                Err(e) => {
                    failed.extend(
                        wave.iter()
                            .map(|id| (id.clone(), format!("{}: {}", e.code, e.message))),
                    );
                }
                Ok(outs) => {
                    results
                        .request_ids
                        .extend(outs.into_iter().filter_map(|o| o.request_id));
                    let outcome = if until == WaitUntil::None {
                        Ok(HashMap::new())
                    } else {
                        let watcher = self
                            .pool
                            .watcher(account, region)
                            .await
                            .map_err(|e| super::failed(e, results.clone()))?;
                        watcher
                            .wait(wave, until, timeout, interval, |_, _| {})
                            .await
                    };
                    match outcome {
                        Ok(seen) => {
                            let t = started.elapsed().as_secs_f64();
                            for id in wave.iter() {
                                to_ok.insert(id.clone(), t);
                            }
                            last.extend(seen);
                            done.extend(wave.iter().cloned());
                        }
                        Err(f) => {
                            let (seen, why) = match f {
                                WaitFailure::Timeout(seen) => (seen, "WaitTimeout".to_string()),
                                WaitFailure::Failed { code, last, .. } => (last, code),
                                WaitFailure::Aws(e) => (HashMap::new(), e.code),
                            };
                            for id in wave.iter() {
                                if evaluate(until, seen.get(id)) == Verdict::Done {
                                    done.push(id.clone());
                                } else {
                                    failed.push((id.clone(), why.clone()));
                                }
                            }
                            last.extend(seen);
                        }
                    }
                }
            }
            let waves = Checkpoint::Waves {
                done: done.clone(),
                failed: failed.clone(),
            };
            waves.save(ctx).await?;
        }
        let untouched: Vec<String> = todo
            .iter()
            .filter(|id| !done.contains(id) && !failed.iter().any(|(f, _)| f == *id))
            .cloned()
            .collect();
        let seen = WaitOutcome {
            last,
            to_ok,
            ..Default::default()
        };
        let mut rows = self.final_results(ec2, ids, before, &seen, todo).await;
        for r in &mut rows {
            let id = &r.instance_id;
            if let Some((_, why)) = failed.iter().find(|(f, _)| f == id) {
                r.outcome = Some(format!("failed: {why}"));
            } else if untouched.contains(id) {
                r.outcome = Some("not touched: max_errors exceeded".into());
            }
        }
        results.instances = rows;
        let summary = format!(
            "{op} in waves of at most {size}: {} done, {} failed, {} not touched (max_errors {max_errors})",
            done.len(),
            failed.len(),
            untouched.len()
        );
        results.summary = Some(summary.clone());
        ctx.progress("done", &summary, Some(done.len() as u64), Some(n as u64))
            .await?;
        if failed.len() > max_errors {
            let list: Vec<String> = failed
                .iter()
                .map(|(id, why)| format!("{id} ({why})"))
                .collect();
            return Err(ExecError::Failed {
                error: JobError {
                    code: "MaxErrorsExceeded".into(),
                    message: format!(
                        "{} instance(s) failed, more than max_errors {max_errors}: {}; {} done; {} not touched: {}",
                        failed.len(),
                        list.join(", "),
                        done.len(),
                        untouched.len(),
                        untouched.join(", ")
                    ),
                    request_id: None,
                },
                transient: false,
                results,
            });
        }
        Ok(results)
    }
}
