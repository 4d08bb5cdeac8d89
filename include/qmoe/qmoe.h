// qmoe/qmoe.h — everything public.
#pragma once
#include "qmoe/config.h"
#include "qmoe/error.h"
#include "qmoe/file.h"
#include "qmoe/layer.h"
#include "qmoe/quantize.h"
#include "qmoe/sysinfo.h"
#include "qmoe/tensor.h"
#include "qmoe/weights.h"
