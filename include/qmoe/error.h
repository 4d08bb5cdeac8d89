// qmoe/error.h — the one exception type qmoe throws.
#pragma once

#include <stdexcept>
#include <string>

namespace qmoe {

/// Thrown for every contract violation (bad shape, dtype, attribute value,
/// foreign packed data) and for unsupported features. The message names the
/// offending tensor or attribute and gives the expected and the actual value.
/// qmoe never reports such problems any other way: no crash, no silent result.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace qmoe
