// MetricsRegistry: families of metrics keyed by name, their label sets, and the text exposition.

#include <algorithm>
#include <map>
#include <mutex>

#include "dserve/core/check.h"
#include "dserve/ops/metrics.h"
#include "text_format.h"

namespace dserve::ops {
namespace {

enum class MetricType { kCounter, kGauge, kHistogram };

std::string_view type_name(MetricType type) {
  switch (type) {
    case MetricType::kCounter:
      return "counter";
    case MetricType::kGauge:
      return "gauge";
    case MetricType::kHistogram:
      return "histogram";
  }
  return "untyped";
}

// All metrics of one name. The label names are fixed by the first registration; each distinct
// tuple of label values (in label-name order) has its own metric, made on first use.
struct Family {
  std::string name;
  std::string help;
  MetricType type;
  std::vector<std::string> label_names;
  std::vector<double> upper_bounds;  // histograms only

  mutable std::mutex mu;  // guards the three maps (only the one of `type` is used)
  std::map<std::vector<std::string>, std::unique_ptr<Counter>> counters;
  std::map<std::vector<std::string>, std::unique_ptr<Gauge>> gauges;
  std::map<std::vector<std::string>, std::unique_ptr<Histogram>> histograms;
};

std::vector<std::string> sorted_names(const Labels& labels) {
  std::vector<std::string> names;
  names.reserve(labels.size());
  for (const Label& l : labels)
    names.push_back(l.name);
  std::sort(names.begin(), names.end());
  return names;
}

// The label values of `labels` in the family's label-name order. Pre: same set of names.
std::vector<std::string> values_in_family_order(const Family& family, const Labels& labels) {
  std::vector<std::string> values;
  values.reserve(family.label_names.size());
  for (const std::string& name : family.label_names) {
    const auto it =
        std::find_if(labels.begin(), labels.end(), [&](const Label& l) { return l.name == name; });
    values.push_back(it->value);
  }
  return values;
}

// The sample names a family writes: a histogram `x` writes x_bucket, x_sum and x_count.
std::vector<std::string> sample_names(std::string_view name, MetricType type) {
  if (type != MetricType::kHistogram) return {std::string(name)};
  const std::string n(name);
  return {n + "_bucket", n + "_sum", n + "_count"};
}

void append_labels(std::string& out, const std::vector<std::string>& names,
                   const std::vector<std::string>& values, std::string_view le) {
  if (names.empty() && le.empty()) return;
  out += '{';
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += ',';
    out += names[i];
    out += "=\"";
    internal::append_escaped_label_value(out, values[i]);
    out += '"';
  }
  if (!le.empty()) {
    if (!names.empty()) out += ',';
    out += "le=\"";
    out += le;
    out += '"';
  }
  out += '}';
}

void append_sample(std::string& out, std::string_view name, const std::vector<std::string>& names,
                   const std::vector<std::string>& values, std::string_view le, double value) {
  out += name;
  append_labels(out, names, values, le);
  out += ' ';
  internal::append_number(out, value);
  out += '\n';
}

void append_family(std::string& out, const Family& f) {
  out += "# HELP ";
  out += f.name;
  out += ' ';
  internal::append_escaped_help(out, f.help);
  out += "\n# TYPE ";
  out += f.name;
  out += ' ';
  out += type_name(f.type);
  out += '\n';

  std::lock_guard lock(f.mu);
  for (const auto& [values, c] : f.counters) {
    append_sample(out, f.name, f.label_names, values, {}, c->value());
  }
  for (const auto& [values, g] : f.gauges) {
    append_sample(out, f.name, f.label_names, values, {}, g->value());
  }
  const std::string bucket = f.name + "_bucket";
  std::string le;
  for (const auto& [values, h] : f.histograms) {
    const Histogram::Snapshot s = h->snapshot();
    for (size_t i = 0; i < s.cumulative_counts.size(); ++i) {
      le.clear();
      if (i < s.upper_bounds.size()) {
        internal::append_number(le, s.upper_bounds[i]);
      } else {
        le = "+Inf";
      }
      append_sample(out, bucket, f.label_names, values, le,
                    static_cast<double>(s.cumulative_counts[i]));
    }
    append_sample(out, f.name + "_sum", f.label_names, values, {}, s.sum);
    append_sample(out, f.name + "_count", f.label_names, values, {}, static_cast<double>(s.count));
  }
}

}  // namespace

struct MetricsRegistry::State {
  mutable std::mutex mu;  // guards both maps; never held while a metric is updated
  std::map<std::string, std::unique_ptr<Family>, std::less<>> families;
  std::map<std::string, std::string, std::less<>> sample_owner;  // sample name -> family name

  // The family `name`, made on first use; aborts when the call disagrees with the family.
  Family& family(std::string_view name, std::string_view help, MetricType type,
                 const Labels& labels, std::span<const double> upper_bounds) {
    const std::string what = std::string(type_name(type)) + " '" + std::string(name) + "'";
    DSERVE_CHECK_MSG(internal::is_valid_metric_name(name),
                     what + ": a metric name matches [a-zA-Z_:][a-zA-Z0-9_:]*");
    DSERVE_CHECK_MSG(type != MetricType::kCounter || name.ends_with("_total"),
                     what + ": a counter's name ends in _total");
    DSERVE_CHECK_MSG(!help.empty(), what + ": every metric has a help text");
    for (size_t i = 0; i < labels.size(); ++i) {
      const std::string& ln = labels[i].name;
      DSERVE_CHECK_MSG(internal::is_valid_label_name(ln),
                       what + ": label name '" + ln +
                           "' must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __");
      DSERVE_CHECK_MSG(type != MetricType::kHistogram || ln != "le",
                       what + ": the label 'le' is reserved for histogram buckets");
      for (size_t j = 0; j < i; ++j) {
        DSERVE_CHECK_MSG(labels[j].name != ln, what + ": label '" + ln + "' given twice");
      }
    }

    std::lock_guard lock(mu);
    if (auto it = families.find(name); it != families.end()) {
      Family& f = *it->second;
      DSERVE_CHECK_MSG(f.type == type,
                       what + " is already registered as a " + std::string(type_name(f.type)));
      DSERVE_CHECK_MSG(f.help == help, what + " is already registered with another help text");
      std::vector<std::string> family_names = f.label_names;
      std::sort(family_names.begin(), family_names.end());
      DSERVE_CHECK_MSG(family_names == sorted_names(labels),
                       what + " is already registered with other label names");
      DSERVE_CHECK_MSG(std::equal(f.upper_bounds.begin(), f.upper_bounds.end(),
                                  upper_bounds.begin(), upper_bounds.end()),
                       what + " is already registered with other bucket bounds");
      return f;
    }
    // A family takes its own name and every sample name it writes, so no two families can
    // write the same sample (a gauge `x_count` beside a histogram `x`).
    std::vector<std::string> claimed = sample_names(name, type);
    if (type == MetricType::kHistogram) claimed.emplace_back(name);
    for (const std::string& sample : claimed) {
      const auto owner = sample_owner.find(sample);
      // The message is only built when the check fails, so owner is valid there.
      DSERVE_CHECK_MSG(
          owner == sample_owner.end(),
          what + ": the sample name '" + sample + "' is already taken by '" + owner->second + "'");
    }

    auto f = std::make_unique<Family>();
    f->name = std::string(name);
    f->help = std::string(help);
    f->type = type;
    for (const Label& l : labels)
      f->label_names.push_back(l.name);
    f->upper_bounds.assign(upper_bounds.begin(), upper_bounds.end());
    for (const std::string& sample : claimed)
      sample_owner[sample] = f->name;
    Family& ref = *f;
    families.emplace(f->name, std::move(f));
    return ref;
  }
};

MetricsRegistry::MetricsRegistry() : state_(std::make_unique<State>()) {}
MetricsRegistry::~MetricsRegistry() = default;

Counter& MetricsRegistry::counter(std::string_view name, std::string_view help,
                                  const Labels& labels) {
  Family& f = state_->family(name, help, MetricType::kCounter, labels, {});
  std::lock_guard lock(f.mu);
  auto& slot = f.counters[values_in_family_order(f, labels)];
  if (!slot) slot = std::make_unique<Counter>();
  return *slot;
}

Gauge& MetricsRegistry::gauge(std::string_view name, std::string_view help, const Labels& labels) {
  Family& f = state_->family(name, help, MetricType::kGauge, labels, {});
  std::lock_guard lock(f.mu);
  auto& slot = f.gauges[values_in_family_order(f, labels)];
  if (!slot) slot = std::make_unique<Gauge>();
  return *slot;
}

Histogram& MetricsRegistry::histogram(std::string_view name, std::string_view help,
                                      std::span<const double> upper_bounds, const Labels& labels) {
  Family& f = state_->family(name, help, MetricType::kHistogram, labels, upper_bounds);
  std::lock_guard lock(f.mu);
  auto& slot = f.histograms[values_in_family_order(f, labels)];
  if (!slot) slot = std::make_unique<Histogram>(upper_bounds);
  return *slot;
}

std::string MetricsRegistry::text_exposition() const {
  std::string out;
  std::lock_guard lock(state_->mu);
  for (const auto& [name, family] : state_->families)
    append_family(out, *family);
  return out;
}

}  // namespace dserve::ops
