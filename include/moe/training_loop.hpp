#pragma once
/// @file training_loop.hpp
/// @brief A seeded training loop with a progress line: moe::train_loop runs a step function a given number
/// of times and shows step, loss, aux loss and tokens/s on one updating stderr line (moe::ProgressLine).

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

#include "config.hpp"
#include "error.hpp"
#include "random.hpp"

namespace moe {

/// What one training step reports to train_loop.
struct StepReport {
  double loss = 0;      ///< task loss of the step
  double aux_loss = 0;  ///< balance/z losses of the step (already scaled by their coefficients)
  Index tokens = 0;     ///< tokens the step processed (for tokens/s)
};

/// A one-line progress display: "label  step 120/600  loss 0.01234  aux 0.01000  52.1k tokens/s", rewritten
/// in place (carriage return) at most every `interval` seconds and once more at finish().
class ProgressLine {
 public:
  /// @param label shown first; @param total_steps the denominator; @param out stream (nullptr: silent)
  ProgressLine(std::string label, long total_steps, std::FILE* out = stderr, double interval = 0.25)
      : label_(std::move(label)), total_(total_steps), out_(out), interval_(interval) {}

  /// Records step `step` (1-based) and redraws when the interval has passed or at the last step.
  void update(long step, const StepReport& r) {
    step_ = step;
    last_ = r;
    tokens_ += static_cast<double>(r.tokens);
    const double now = seconds();
    if (now - drawn_at_ >= interval_ || step == total_) draw(now);
  }
  /// Draws the final state and ends the line.
  void finish() {
    if (out_ == nullptr || finished_) return;
    if (drawn_step_ != step_) draw(seconds());
    std::fputc('\n', out_);
    std::fflush(out_);
    finished_ = true;
  }
  /// Seconds since construction.
  double seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  }
  /// Tokens per second over the whole run so far.
  double tokens_per_second() const {
    const double s = seconds();
    return s > 0 ? tokens_ / s : 0;
  }

 private:
  void draw(double now) {
    drawn_at_ = now;
    drawn_step_ = step_;
    if (out_ == nullptr) return;
    const double rate = now > 0 ? tokens_ / now : 0;
    std::fprintf(out_, "\r%s  step %ld/%ld  loss %.5g  aux %.5g  %.1fk tokens/s   ", label_.c_str(), step_, total_,
                 last_.loss, last_.aux_loss, rate / 1e3);
    std::fflush(out_);
  }

  std::string label_;
  long total_;
  std::FILE* out_;
  double interval_;
  long step_ = 0;
  StepReport last_;
  double tokens_ = 0;
  double drawn_at_ = -1e9;
  long drawn_step_ = -1;
  bool finished_ = false;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
};

/// Options of train_loop.
struct TrainingLoopOptions {
  long steps = 100;            ///< steps to run (>= 0)
  std::uint64_t seed = 1;      ///< seeds the Rng handed to every step: same seed, same run
  std::string label = "train"; ///< progress-line label
  std::FILE* progress = stderr;  ///< where the progress line goes (nullptr: silent)
};

/// What train_loop returns.
struct TrainingSummary {
  long steps = 0;            ///< steps run
  StepReport last;           ///< the last step's report
  double seconds = 0;        ///< wall time
  double tokens_per_second = 0;
};

/// Runs `step(step_index, rng)` for step_index = 0 .. steps-1 with one Rng(seed) shared by all steps (draw
/// batches, noise, dropout from it: the run is then reproducible), showing a progress line. `step` returns a
/// StepReport. Throws moe::Error when a step reports a NaN or infinite loss (naming the step), so a diverged
/// run stops at once instead of training on garbage.
template <class F>
TrainingSummary train_loop(const TrainingLoopOptions& opt, F&& step) {
  detail::require(opt.steps >= 0, "moe::train_loop: steps = ", opt.steps, " must be >= 0");
  Rng rng(opt.seed);
  ProgressLine line(opt.label, opt.steps, opt.progress);
  TrainingSummary s;
  for (long i = 0; i < opt.steps; ++i) {
    const StepReport r = step(i, rng);
    detail::require(std::isfinite(r.loss) && std::isfinite(r.aux_loss), "moe::train_loop: step ", i,
                    " reported loss = ", r.loss, ", aux loss = ", r.aux_loss, " (not finite: the run diverged)");
    line.update(i + 1, r);
    s.last = r;
    s.steps = i + 1;
  }
  line.finish();
  s.seconds = line.seconds();
  s.tokens_per_second = line.tokens_per_second();
  return s;
}

}  // namespace moe
